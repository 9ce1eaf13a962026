"""Specification of tf_mamlpp.run.config and config_flags: the settings of a run, listed once."""

import dataclasses
import inspect
import json
import pathlib
import re
import subprocess
import sys

import pytest
from absl import flags

import tf_mamlpp
from tf_mamlpp.config_error import ConfigError
from tf_mamlpp.core.batch_norm_modes import BN_MODES, TASK_NORM_ALPHAS
from tf_mamlpp.run import config_flags, preflight
from tf_mamlpp.run.config import (DATASETS, NON_NEGATIVE, POSITIVE, ExperimentConfig,
                                  command_line_fields, resolve)

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]
FIELDS = {field.name: field for field in dataclasses.fields(ExperimentConfig)}


@pytest.fixture
def parsed_flags():
    """Fresh flags of the config fields, parsed from a command line that sets none."""
    flag_values = flags.FlagValues()
    config_flags.define_config_flags(flag_values)
    flag_values(["main.py"])
    return flag_values


def test_resolve_fills_the_papers_omniglot_settings():
    config = resolve("omniglot")
    assert config.dataset == "omniglot"
    # Antoniou et al. (2019) on Omniglot: 64 filters, meta-batch 8, one target
    # image per class, inner learning rate 0.1, 28x28 grey images.
    assert (config.filters, config.batch_size, config.query, config.inner_lr) == (64, 8, 1, 0.1)
    assert (config.image_size, config.channels) == (28, 1)
    assert pathlib.Path(config.data_dir) == REPOSITORY / "datasets" / "omniglot"
    assert config.eval_inner_steps == config.inner_steps == 5


def test_resolve_fills_the_papers_natural_image_settings():
    for dataset in ("mini_imagenet", "folder"):
        config = resolve(dataset)
        assert (config.filters, config.batch_size, config.query, config.inner_lr) == (
            48, 2, 15, 0.01)
        assert (config.image_size, config.inner_steps, config.augment) == (84, 5, False)
    assert resolve("mini_imagenet").channels == 3
    # A folder's channels are read from its images, and it has no default folder.
    assert (resolve("folder").channels, resolve("folder").data_dir) == (None, None)


def test_the_dataclass_defaults_are_omniglots_paper_settings():
    assert ExperimentConfig() == resolve("omniglot")


def test_explicit_values_win_and_none_means_default():
    config = resolve("omniglot", filters=32, way=20, shot=5, inner_steps=3, batch_size=None,
                     inner_lr=0.4, msl=False, data_dir="/elsewhere")
    assert (config.filters, config.way, config.shot, config.inner_steps) == (32, 20, 5, 3)
    assert (config.inner_lr, config.msl, config.data_dir) == (0.4, False, "/elsewhere")
    assert config.batch_size == 8
    # Evaluation takes as many steps as training unless told otherwise.
    assert config.eval_inner_steps == 3
    assert resolve("omniglot", inner_steps=3, eval_inner_steps=7).eval_inner_steps == 7
    assert ExperimentConfig(inner_steps=2).eval_inner_steps == 2


def test_unknown_dataset_raises_naming_the_setting():
    with pytest.raises(ConfigError, match="dataset='mini_imagenet_typo' is unknown") as raised:
        resolve("mini_imagenet_typo")
    assert "omniglot" in str(raised.value)
    assert raised.value.fields == ("dataset",)


def test_json_round_trip():
    config = resolve("omniglot", way=20, shot=5, seed=3, second_order=False, bn_mode="running")
    text = config.to_json()
    assert json.loads(text)["way"] == 20
    assert ExperimentConfig.from_json(text) == config
    assert ExperimentConfig.from_json(text).to_json() == text


def test_task_norms_flags_reach_the_config_and_round_trip_through_its_json():
    flag_values = flags.FlagValues()
    config_flags.define_config_flags(flag_values)
    flag_values(["main.py", "--bn_mode=task_norm", "--task_norm_alpha=per_step",
                 "--task_norm_unbiased", "--task_norm_start=half"])
    config = resolve("omniglot", **config_flags.config_values(flag_values))
    assert (config.task_norm_alpha, config.task_norm_unbiased, config.task_norm_start) == (
        "per_step", True, "half")
    assert ExperimentConfig.from_json(config.to_json()) == config
    default = resolve("omniglot")
    assert (default.task_norm_alpha, default.task_norm_unbiased, default.task_norm_start) == (
        "size", False, "reptile")


@pytest.mark.parametrize("settings, ran_with", [
    (dict(bn_mode="task_norm"), "half"), (dict(bn_mode="task_norm", task_norm_alpha="direct"), "half"),
    (dict(bn_mode="task_norm", task_norm_alpha="reptile"), "reptile"),
    (dict(bn_mode="support"), "reptile"), (dict(bn_mode="transductive"), "reptile")])
def test_a_run_saved_before_task_norm_start_existed_reads_as_it_ran(settings, ran_with):
    """A learned blend then started at 1/2; other runs had none, and read as the default,
    so that they reopen in their own mode."""
    saved = json.loads(resolve("omniglot", **settings).to_json())
    del saved["task_norm_start"]
    config = ExperimentConfig.from_json(json.dumps(saved))
    assert config.task_norm_start == ran_with
    preflight.check_settings(config)


def test_a_run_saved_before_bn_mode_existed_reads_as_transductive():
    """Every run then normalised its targets transductively, whatever the default is now."""
    saved = json.loads(resolve("omniglot", bn_mode="transductive").to_json())
    for name in ("bn_mode", "task_norm_alpha", "task_norm_unbiased", "task_norm_start"):
        del saved[name]
    config = ExperimentConfig.from_json(json.dumps(saved))
    assert config == resolve("omniglot", bn_mode="transductive")
    preflight.check_settings(config)


@pytest.mark.parametrize("settings, flags_named", [
    (dict(task_norm_alpha="reptile"), "--task_norm_alpha=reptile"),
    (dict(task_norm_alpha="direct", task_norm_unbiased=True),
     "--task_norm_alpha=direct --task_norm_unbiased=True"),
    (dict(task_norm_start="half"), "--task_norm_start=half")])
def test_task_norms_options_outside_task_norm_are_a_one_line_error_naming_them(settings,
                                                                               flags_named):
    config = resolve("omniglot", bn_mode="support", **settings)
    with pytest.raises(ConfigError) as raised:
        preflight.check_settings(config)
    assert raised.value.spelled("--") == (f"{flags_named} conflicts with --bn_mode=support; it "
                                          "applies to --bn_mode=task_norm only")
    preflight.check_settings(dataclasses.replace(config, bn_mode="task_norm"))


def test_total_iterations():
    assert resolve("omniglot", epochs=7, iters_per_epoch=11).total_iterations == 77


def test_architecture_differences_name_only_the_fields_that_break_checkpoints():
    config = resolve("omniglot")
    other = dataclasses.replace(config, way=20, filters=32, epochs=3, meta_lr=0.5, seed=9)
    assert sorted(config.architecture_differences(other)) == ["filters", "way"]
    assert config.architecture_differences(dataclasses.replace(config, epochs=1)) == []


def test_the_architecture_fields_are_what_a_checkpoint_depends_on():
    architecture = {name for name, field in FIELDS.items() if field.metadata["architecture"]}
    assert architecture == {"dataset", "way", "shot", "filters", "num_stages", "inner_steps",
                            "image_size", "channels", "bnrs", "bnwb", "lslr", "iters_per_epoch",
                            "batch_size", "mixed_precision", "bn_mode", "task_norm_alpha",
                            "task_norm_unbiased", "task_norm_start", "backbone"}


def test_every_command_line_field_has_a_flag_and_only_those(parsed_flags):
    assert set(parsed_flags) == {field.name for field in command_line_fields()}
    # The dataset picks the other defaults and is main.py's own flag.
    assert {"dataset", "num_stages"}.isdisjoint(parsed_flags)


def test_the_kind_of_flag_follows_the_fields_type(parsed_flags):
    kinds = {name: parsed_flags[name].flag_type() for name in parsed_flags}
    assert kinds["way"] == "int" and kinds["channels"] == "int"
    assert kinds["meta_lr"] == "float" and kinds["in_memory_limit_gb"] == "float"
    assert kinds["msl"] == "bool" and kinds["augment"] == "bool"
    assert kinds["data_dir"] == "string" and kinds["split_ratios"] == "string"
    assert kinds["bn_mode"] == kinds["omniglot_split"] == "string enum"
    assert parsed_flags["bn_mode"].parser.enum_values == list(BN_MODES)
    assert kinds["task_norm_alpha"] == "string enum" and kinds["task_norm_unbiased"] == "bool"
    assert parsed_flags["task_norm_alpha"].parser.enum_values == list(TASK_NORM_ALPHAS)
    assert parsed_flags["omniglot_split"].parser.enum_values == ["mamlpp", "lake"]


def test_unset_flags_take_each_datasets_paper_values(parsed_flags):
    for name, field in FIELDS.items():
        if field.metadata["per_dataset"] is not None:
            assert parsed_flags[name].value is None, name
    for dataset in DATASETS:
        assert resolve(dataset, **config_flags.config_values(parsed_flags)) == resolve(dataset)


def test_a_per_dataset_default_is_applied_to_every_dataset_that_has_one():
    for dataset in DATASETS:
        config = resolve(dataset)
        for name, field in FIELDS.items():
            if field.metadata["per_dataset"] is not None:
                assert getattr(config, name) == field.metadata["per_dataset"][dataset], name


def test_set_flags_reach_the_config():
    flag_values = flags.FlagValues()
    config_flags.define_config_flags(flag_values)
    flag_values(["main.py", "--inner_steps=3", "--nomsl", "--bn_mode=support", "--meta_lr=0.01"])
    config = resolve("mini_imagenet", **config_flags.config_values(flag_values))
    assert (config.inner_steps, config.eval_inner_steps, config.msl) == (3, 3, False)
    assert (config.bn_mode, config.meta_lr, config.filters) == ("support", 0.01, 48)


@pytest.mark.parametrize("arguments, expected", [
    ([], "auto"), (["--mixed_precision"], True), (["--nomixed_precision"], False),
    (["--mixed_precision=auto"], "auto"), (["--mixed_precision=AUTO"], "auto"),
    (["--mixed_precision=false"], False), (["--mixed_precision=1"], True)])
def test_mixed_precision_is_a_bool_flag_that_also_takes_auto(arguments, expected):
    flag_values = flags.FlagValues()
    config_flags.define_config_flags(flag_values)
    flag_values(["main.py", *arguments])
    resolved = resolve("omniglot", **config_flags.config_values(flag_values)).mixed_precision
    assert resolved == expected and type(resolved) is type(expected)


def test_mixed_precision_refuses_other_values_naming_them():
    flag_values = flags.FlagValues()
    config_flags.define_config_flags(flag_values)
    with pytest.raises(flags.IllegalFlagValueError,
                       match=r"--mixed_precision=maybe: must be true, false or auto"):
        flag_values(["main.py", "--mixed_precision=maybe"])


def test_every_help_text_states_the_default(parsed_flags):
    helps = {name: parsed_flags[name].help for name in parsed_flags}
    assert all("Default" in text for text in helps.values()), helps
    assert helps["way"] == "Classes per task (N). Default 5."
    assert helps["meta_lr"].endswith("Default 0.001.")
    assert helps["msl"].endswith("Default true.")
    assert helps["filters"] == ("Filters of each conv stage. Default: 64 on omniglot, 48 on "
                                "mini_imagenet, folder, cifar_fs, fc100, cub and tfds:NAME.")
    assert helps["inner_steps"].endswith("Default: 5 on every dataset.")
    # Shipped data is shown where it lies in the repository, not on this machine.
    assert helps["data_dir"].endswith("Default: datasets/omniglot on omniglot, "
                                      "datasets/mini_imagenet on mini_imagenet.")


# The library's entry points whose keywords are named as the flags.
LIBRARY = ("MamlppNetwork", "KerasBackbone", "MetaLearner", "Schedule", "meta_optimizer")


def library_keyword_of(name):
    """The README's third column: the library entry points that take `name` as a keyword."""
    return ", ".join(f"`{entry}`" for entry in LIBRARY
                     if name in inspect.signature(getattr(tf_mamlpp, entry)).parameters)


def test_the_readme_flag_table_shows_the_help_texts_and_the_library_keywords(parsed_flags):
    readme = (REPOSITORY / "README.md").read_text()
    table = readme[readme.index("\n## Flags\n"):]
    for name in parsed_flags:
        expected = parsed_flags[name].help.replace("|", "\\|")
        assert f"\n| `--{name}` | {expected} | {library_keyword_of(name)} |\n" in table, name


@pytest.mark.parametrize("field", [field for field in FIELDS.values()
                                   if field.metadata["configures"]], ids=lambda field: field.name)
def test_a_setting_that_configures_a_library_object_is_its_keyword_of_the_same_name(field):
    entries = {"network": tf_mamlpp.MamlppNetwork, "backbone": tf_mamlpp.KerasBackbone,
               "schedule": tf_mamlpp.Schedule, "optimizer": tf_mamlpp.meta_optimizer}
    for target in field.metadata["configures"]:
        assert field.name in inspect.signature(entries[target]).parameters, target


def constrained(constraint):
    return [name for name, field in FIELDS.items() if field.metadata["constraint"] == constraint]


@pytest.mark.parametrize("name", constrained(POSITIVE))
def test_a_positive_setting_rejects_zero_naming_it(name):
    config = dataclasses.replace(resolve("omniglot"), **{name: 0})
    with pytest.raises(ConfigError, match=rf"^{name}=0: must be") as raised:
        preflight.check_settings(config)
    assert raised.value.fields == (name,)


@pytest.mark.parametrize("name", constrained(NON_NEGATIVE))
def test_a_non_negative_setting_rejects_minus_one_naming_it(name):
    config = dataclasses.replace(resolve("omniglot"), **{name: -1})
    with pytest.raises(ConfigError, match=rf"^{name}=-1: must not be negative"):
        preflight.check_settings(config)


def test_a_setting_with_choices_rejects_others_naming_it():
    config = dataclasses.replace(resolve("folder", data_dir="/data"), bn_mode="metabn")
    with pytest.raises(ConfigError, match="bn_mode='metabn': must be one of transductive"):
        preflight.check_settings(config)
    config = dataclasses.replace(resolve("folder", data_dir="/data"), channels=2)
    with pytest.raises(ConfigError, match="channels=2: must be one of 1, 3"):
        preflight.check_settings(config)


def test_the_command_line_names_the_flag_before_tensorflow_loads(tmp_path):
    # -X importtime lists every module imported; TensorFlow must not be one.
    completed = subprocess.run(
        [sys.executable, "-X", "importtime", str(REPOSITORY / "main.py"), "--inner_steps=0",
         f"--logdir={tmp_path}"],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert lines[-1] == "error: --inner_steps=0: must be at least 1"
    imported = [line.split("|")[-1].strip() for line in lines if line.startswith("import time:")]
    assert "tf_mamlpp.run.preflight" in imported
    assert not [name for name in imported if re.match(r"tensorflow(\.|$)", name)]
    assert not any(tmp_path.iterdir())
