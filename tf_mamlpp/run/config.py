"""The configuration of a run: every setting, with its meaning, defaults and constraint.

`ExperimentConfig` is the single list of settings. Each field carries, in its
metadata (see `setting`), what the rest of the project needs to know about it:
main.py makes its flags from them (config_flags.py), preflight.py checks the
constraints, a run directory refuses checkpoints whose architecture fields
differ, builders.py passes each to the library object it configures under
its own name (flag, field and keyword are one word), and `resolve` fills
in the value that Antoniou et al. (2019) use for the dataset where the
user gave none. The resolved configuration is logged at
start and saved with the run, so a run records exactly what it did.
"""

import dataclasses
import json
import os
import types

from tf_mamlpp.config_error import ConfigError
from tf_mamlpp.core.batch_norm_modes import (BN_MODES, DEFAULT_MODE, HALF_START, REPTILE_ALPHA,
                                             REPTILE_START, SIZE_ALPHA, TASK_NORM,
                                             TASK_NORM_ALPHAS, TASK_NORM_STARTS,
                                             TRANSDUCTIVE)
from tf_mamlpp.data.benchmark_splits import BENCHMARKS
from tf_mamlpp.data.image_folders import DEFAULT_SPLIT_RATIOS
from tf_mamlpp.data.tfds_source import DEFAULT_LABEL

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The data shipped with the project, found wherever the command is run from.
SHIPPED_DATA = os.path.join(REPOSITORY, "datasets")

# "folder" is any folder of class folders: it takes the paper's natural-image
# settings, with the channels read from the images and no default data_dir.
# The few-shot benchmarks (benchmark_splits.py) and `tfds:NAME`, any image set
# of TensorFlow Datasets, are read through tfds; a tfds set's channels are its
# images' own. TFDS stands for every `tfds:NAME` where a dataset's defaults are
# looked up.
TFDS_PREFIX = "tfds:"
TFDS = f"{TFDS_PREFIX}NAME"
NATURAL_IMAGES = ("mini_imagenet", "folder", *BENCHMARKS, TFDS)
DATASETS = ("omniglot", *NATURAL_IMAGES)
DEFAULT_DATASET = "omniglot"

# A setting's value where the run decides it at its start (--mixed_precision=auto).
AUTO = "auto"

# Constraints of a setting (besides a tuple of the values allowed).
POSITIVE = "positive"
NON_NEGATIVE = "non-negative"

# The library objects a setting configures, as the keyword of its own name (builders.py).
NETWORK = "network"  # MamlppNetwork
BACKBONE = "backbone"  # KerasBackbone, around the model of --backbone
SCHEDULE = "schedule"  # schedules.Schedule
OPTIMIZER = "optimizer"  # schedules.meta_optimizer


def natural_images(value, **exceptions):
    """per_dataset values of NATURAL_IMAGES: `value`, as Antoniou et al. (2019) set it for
    mini-ImageNet, except where a data set's own papers differ (`exceptions`)."""
    return {dataset: exceptions.get(dataset, value) for dataset in NATURAL_IMAGES}


def setting(default=None, *, help_text, architecture=False, constraint=None, per_dataset=None,
            command_line=True, configures=(), recorded_before=None):
    """A field of ExperimentConfig, described for the command line and the checks.

    Args:
      default: the value on every dataset (see `per_dataset`); None only where
        `help_text` says what an unset value means.
      help_text: what the setting does, as --help shows it; the command line
        adds the default, so the text states it only where it is None.
      architecture: a checkpoint of one run cannot continue under another
        value (it changes the network, the task or what an iteration means).
      constraint: POSITIVE, NON_NEGATIVE or a tuple of the allowed values;
        None, an unset value, always passes.
      per_dataset: dataset -> the paper's value (section 5 and the reference
        code), where it depends on the dataset; the field's own default is
        then Omniglot's.
      command_line: whether main.py makes a flag of it.
      configures: the library objects (NETWORK, BACKBONE, SCHEDULE, OPTIMIZER) that take
        the setting as a keyword argument of the same name.
      recorded_before: values saved -> the value that a run whose saved
        configuration predates the setting ran with, where that may not be
        `default`.
    """
    if per_dataset is not None:
        default = per_dataset[DEFAULT_DATASET]
    return dataclasses.field(default=default, metadata={
        "help": help_text, "architecture": architecture, "constraint": constraint,
        "per_dataset": per_dataset, "command_line": command_line, "configures": configures,
        "recorded_before": recorded_before})


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything a run depends on; each field's metadata says what it means."""

    dataset: str = setting(
        DEFAULT_DATASET, architecture=True, command_line=False,
        help_text=f"Dataset name, one of {', '.join(DATASETS)}; picks the per-dataset defaults.")
    data_dir: str | None = setting(
        per_dataset=dict(omniglot=os.path.join(SHIPPED_DATA, "omniglot"), **natural_images(
            None, mini_imagenet=os.path.join(SHIPPED_DATA, "mini_imagenet"))),
        help_text="Folder of the dataset's files; required for --dataset=folder. Omniglot is "
                  "shipped in its default folder (and fetched by tensorflow-datasets without "
                  "it); mini-ImageNet must be put in its own.")
    omniglot_split: str = setting(
        "mamlpp", constraint=("mamlpp", "lake"),
        help_text="Class split: mamlpp (1150/50/423 of all 1623 characters, as the paper) or "
                  "lake (background alphabets for training and validation, evaluation "
                  "alphabets for test).")
    way: int = setting(5, architecture=True, constraint=POSITIVE,
                       help_text="Classes per task (N).", configures=(NETWORK,))
    shot: int = setting(1, architecture=True, constraint=POSITIVE,
                        help_text="Support images per class (K).")
    # CUB: 16 target images per class, as Chen et al.'s train.py (n_query) takes.
    query: int = setting(per_dataset=dict(omniglot=1, **natural_images(15, cub=16)),
                         constraint=POSITIVE, help_text="Target images per class.")
    batch_size: int = setting(per_dataset=dict(omniglot=8, **natural_images(2)),
                              architecture=True, constraint=POSITIVE,
                              help_text="Tasks per meta-batch.")
    # CIFAR-FS and FC100 keep CIFAR-100's 32x32; CUB is read at 84x84 as by Chen et al.
    image_size: int = setting(per_dataset=dict(omniglot=28,
                                               **natural_images(84, cifar_fs=32, fc100=32)),
                              architecture=True, constraint=POSITIVE,
                              help_text="Side of the square images the files are resized to.")
    channels: int | None = setting(
        per_dataset=dict(omniglot=1, **natural_images(3, folder=None, **{TFDS: None})),
        architecture=True, constraint=(1, 3),
        help_text="1 (grayscale) or 3 (RGB); images are converted to it. Unset on folder and "
                  "tfds:NAME: read from the images.")
    augment: bool = setting(per_dataset=dict(omniglot=True, **natural_images(False)),
                            help_text="Rotate training classes by multiples of 90 degrees, as "
                                      "the paper.")
    split_ratios: str | None = setting(
        help_text="--dataset=folder with no train/val/test, and tfds:NAME: fractions "
                  "train,val,test of its classes (a fixed shuffle). Default "
                  f"{DEFAULT_SPLIT_RATIOS}.")
    tfds_label: str = setting(
        DEFAULT_LABEL,
        help_text="--dataset=tfds:NAME: the class-label feature that gives each image's "
                  "class, e.g. coarse_label.")
    tfds_data_dir: str | None = setting(
        help_text="Where TensorFlow Datasets keeps prepared data sets, for --dataset=cifar_fs, "
                  "fc100, cub and tfds:NAME. Default: tfds's own (~/tensorflow_datasets, or "
                  "$TFDS_DATA_DIR).")
    tfds_download: bool = setting(
        False, help_text="Let TensorFlow Datasets download and prepare a data set that "
                         "--tfds_data_dir lacks (needs internet).")
    in_memory_limit_gb: float = setting(
        4.0, constraint=NON_NEGATIVE,
        help_text="Folder and TensorFlow Datasets data sets whose decoded images take more GiB "
                  "than this are read from the on-disk cache as episodes need them instead of "
                  "held in memory.")
    backbone: str | None = setting(
        architecture=True,
        help_text="The network: unset for the built-in 4-stage conv network, or "
                  "MODULE:FUNCTION, a factory importable from the working directory or the "
                  "Python path that takes (image_shape, way) and returns a Keras 3 model of "
                  "standard layers mapping images to logits, meta-trained through "
                  "KerasBackbone (e.g. tf_mamlpp.backbones:resnet12; --filters does not "
                  "apply to it). Default: the built-in network.")
    filters: int = setting(per_dataset=dict(omniglot=64, **natural_images(48)),
                           architecture=True, constraint=POSITIVE, configures=(NETWORK,),
                           help_text="Filters of each conv stage.")
    num_stages: int = setting(4, architecture=True, constraint=POSITIVE, command_line=False,
                              configures=(NETWORK,),
                              help_text="Conv stages, each of which halves the image.")
    inner_steps: int = setting(per_dataset=dict(omniglot=5, **natural_images(5)),
                               architecture=True, constraint=POSITIVE,
                               configures=(NETWORK, BACKBONE),
                               help_text="Inner-loop steps in training.")
    eval_inner_steps: int | None = setting(
        constraint=POSITIVE,
        help_text="Inner-loop steps at validation and test; steps past --inner_steps reuse "
                  "the last step's BN banks and rates. Default: --inner_steps.")
    inner_lr: float = setting(per_dataset=dict(omniglot=0.1, **natural_images(0.01)),
                              configures=(NETWORK, BACKBONE),
                              help_text="Initial inner learning rate (every layer and step).")
    meta_lr: float = setting(1e-3, constraint=POSITIVE, configures=(OPTIMIZER,),
                             help_text="Adam learning rate at the start.")
    min_meta_lr: float = setting(1e-5, configures=(OPTIMIZER,),
                                 help_text="Learning rate that cosine annealing ends at.")
    epochs: int = setting(100, constraint=POSITIVE, help_text="Training epochs.")
    iters_per_epoch: int = setting(500, architecture=True, constraint=POSITIVE,
                                   help_text="Meta-iterations per epoch.")
    msl: bool = setting(True, configures=(SCHEDULE,),
                        help_text="MSL: multi-step loss, annealed over --msl_epochs.")
    msl_epochs: int = setting(10, constraint=NON_NEGATIVE, configures=(SCHEDULE,),
                              help_text="Epochs after which only the last step's loss counts.")
    da: bool = setting(True, configures=(SCHEDULE,),
                       help_text="DA: derivative-order annealing, first order for "
                                 "--first_order_epochs epochs.")
    first_order_epochs: int = setting(50, constraint=NON_NEGATIVE, configures=(SCHEDULE,),
                                      help_text="Epochs of first-order training under DA.")
    second_order: bool = setting(True, configures=(SCHEDULE,),
                                 help_text="Use second-order meta-gradients (after the DA "
                                           "epochs); false trains first order throughout.")
    bnrs: bool = setting(True, architecture=True, configures=(NETWORK, BACKBONE),
                         help_text="BNRS: per-step batch-norm running statistics.")
    bnwb: bool = setting(True, architecture=True, configures=(NETWORK, BACKBONE),
                         help_text="BNWB: per-step batch-norm weights and biases.")
    lslr: bool = setting(True, architecture=True, configures=(NETWORK, BACKBONE),
                         help_text="LSLR: learned per-layer, per-step inner learning rates.")
    ca: bool = setting(True, configures=(OPTIMIZER,),
                       help_text="CA: cosine annealing of the meta learning rate.")
    bn_mode: str = setting(
        DEFAULT_MODE, architecture=True, constraint=BN_MODES,
        help_text="Batch norm of the target (query) pass, in meta-training and evaluation "
                  "alike: transductive (each batch by its own statistics, as the reference "
                  "code; exported models then normalise queries by the support set's), support "
                  "(MetaBN: the support set's statistics at the same weights), task_norm "
                  "(TaskNorm-I: support and per-image moments blended by a learned weight) or "
                  "running (BNRS: the per-step running banks).",
        configures=(NETWORK, BACKBONE),
        recorded_before=lambda saved: TRANSDUCTIVE)  # the only mode before the setting
    task_norm_alpha: str = setting(
        SIZE_ALPHA, architecture=True, constraint=TASK_NORM_ALPHAS,
        help_text="--bn_mode=task_norm: the weight alpha of the support moments against each "
                  "image's own: size (sigmoid(a * support size + b), a and b learned per "
                  "layer, as the TaskNorm paper), direct (sigmoid(w), w learned per layer: its "
                  "Appendix E, for a fixed support size), per_step (sigmoid(w), one w per layer "
                  "and weight state) or reptile (n / (n + 1) for n support images, not "
                  "learned: each query normalised with the support set and itself).",
        configures=(NETWORK, BACKBONE))
    task_norm_unbiased: bool = setting(
        False, architecture=True, configures=(NETWORK, BACKBONE),
        help_text="--bn_mode=task_norm: Bessel-corrected variances, as the official TaskNorm "
                  "code's torch.var: the support set's over n*H*W - 1 values, each image's "
                  "over H*W - 1; false: biased.")
    task_norm_start: str = setting(
        REPTILE_START, architecture=True, constraint=TASK_NORM_STARTS,
        configures=(NETWORK, BACKBONE), recorded_before=lambda saved: (
            HALF_START if saved.get("bn_mode") == TASK_NORM
            and saved.get("task_norm_alpha", SIZE_ALPHA) != REPTILE_ALPHA else REPTILE_START),
        help_text="--bn_mode=task_norm: where a learned alpha starts: reptile (at n / (n + 1) "
                  "for n support images, RN's weight: log n is added to its logit) or half "
                  "(at 1/2, as the TaskNorm paper).")
    val_tasks: int = setting(600, constraint=POSITIVE, help_text="Fixed validation tasks.")
    test_tasks: int = setting(600, constraint=POSITIVE, help_text="Fixed test tasks.")
    seed: int = setting(0, help_text="Seed of the initialisation and the task streams.")
    ensemble_top_k: int = setting(
        3, constraint=POSITIVE,
        help_text="Best validation checkpoints kept and ensembled at test time, as the paper "
                  "does with three.")
    deterministic: bool = setting(
        False, help_text="Enable TensorFlow's op determinism, so an interrupted and resumed "
                         "run repeats an uninterrupted one exactly.")
    jit_compile: bool = setting(
        False, help_text="Compile the meta-step with XLA (slower on CPU; see "
                         "benchmarks/README.md).")
    fold_tasks: bool = setting(
        False, help_text="Run a meta-batch's tasks together as grouped convolutions instead of "
                         "one after another (slower on CPU; see benchmarks/README.md).")
    # Mixed precision adds the loss scale to the checkpoint and changes the arithmetic.
    mixed_precision: bool | str = setting(
        AUTO, architecture=True, constraint=(False, True, AUTO),
        recorded_before=lambda saved: False,  # runs began in float32 before the setting
        help_text="Meta-train in 16 bits (float16 on a GPU, bfloat16 on a CPU) with float32 "
                  "variables and a dynamic loss scale on the inner and outer losses; "
                  "validation, test and the export stay float32. auto: time a probe "
                  "meta-step in each precision at the run's start (cached per machine and "
                  "shape) and train in the faster; float32 under --deterministic and "
                  "--strategy=multi_worker, where runs or hosts could choose differently.")

    def __post_init__(self):
        if self.eval_inner_steps is None:
            # Evaluation takes as many steps as training unless told otherwise.
            object.__setattr__(self, "eval_inner_steps", self.inner_steps)

    @property
    def total_iterations(self):
        return self.epochs * self.iters_per_epoch

    @property
    def image_shape(self):
        return (self.image_size, self.image_size, self.channels)

    @property
    def tfds_name(self):
        """The TensorFlow Datasets set this run reads, or None where it reads files."""
        if self.dataset.startswith(TFDS_PREFIX):
            return self.dataset.removeprefix(TFDS_PREFIX)
        return BENCHMARKS[self.dataset].tfds_name if self.dataset in BENCHMARKS else None

    def arguments_for(self, target):
        """The settings that configure `target` (NETWORK, ...), as its keyword arguments."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                if target in field.metadata["configures"]}

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text):
        values = json.loads(text)
        for field in dataclasses.fields(cls):
            if field.name not in values and field.metadata["recorded_before"] is not None:
                values[field.name] = field.metadata["recorded_before"](values)
        return cls(**values)

    def architecture_differences(self, other):
        """Names of the fields that make `other`'s checkpoints unusable by this run."""
        return [field.name for field in dataclasses.fields(self)
                if field.metadata["architecture"]
                and getattr(self, field.name) != getattr(other, field.name)]


def why_not_probed(config, multi_worker=False):
    """Why a timing probe must not choose `config`'s precision under AUTO, or None.

    There AUTO means float32 (precision.settled), and main.py refuses an
    explicit --mixed_precision=auto. `multi_worker`: the run spans several hosts.
    """
    if multi_worker:
        return ("--strategy=multi_worker: each host would probe on its own and could "
                "choose differently")
    if config.deterministic:
        return ("--deterministic: a timing probe can choose differently from one run of "
                "the command to the next")
    return None


def value_type(field):
    """bool, int, float or str: the type of the field's values (bool for a bool that takes AUTO)."""
    if isinstance(field.type, types.UnionType):
        return next(member for member in field.type.__args__ if member is not type(None))
    return field.type


def command_line_fields():
    """The fields that main.py makes a flag of."""
    return [field for field in dataclasses.fields(ExperimentConfig)
            if field.metadata["command_line"]]


def resolve(dataset, **overrides):
    """Builds a config from the dataset's paper defaults and explicit values.

    Args:
      dataset: one of DATASETS, TFDS as any `tfds:` name.
      **overrides: field values; None means "the paper's default" (or, for a
        field with no per-dataset default, the field's own).

    Raises:
      ConfigError: for an unknown dataset, naming `dataset`.
    """
    defaults = TFDS if dataset.startswith(TFDS_PREFIX) else dataset
    if defaults not in DATASETS:
        raise ConfigError(f"dataset={dataset!r} is unknown; choose one of {', '.join(DATASETS)}",
                          "dataset")
    values = {field.name: field.metadata["per_dataset"][defaults]
              for field in dataclasses.fields(ExperimentConfig)
              if field.metadata["per_dataset"] is not None}
    values.update({name: value for name, value in overrides.items() if value is not None})
    return ExperimentConfig(dataset=dataset, **values)
