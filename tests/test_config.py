"""Specification of tf_mamlpp.run.config: the resolved configuration of a run."""

import dataclasses
import json
import pathlib

import pytest

from tf_mamlpp.run.config import ExperimentConfig, resolve

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]


def test_resolve_fills_the_papers_omniglot_settings():
    config = resolve("omniglot")
    assert config.dataset == "omniglot"
    # Antoniou et al. (2019) on Omniglot: 64 filters, meta-batch 8, one target
    # image per class, inner learning rate 0.1, 28x28 grey images.
    assert (config.filters, config.batch_size, config.query, config.inner_lr) == (64, 8, 1, 0.1)
    assert (config.image_size, config.channels) == (28, 1)
    assert pathlib.Path(config.data_dir) == REPOSITORY / "datasets" / "omniglot"
    assert config.eval_inner_steps == config.inner_steps


def test_explicit_values_win_and_none_means_default():
    config = resolve("omniglot", filters=32, way=20, shot=5, inner_steps=3, batch_size=None,
                     inner_lr=0.4, msl=False, data_dir="/elsewhere")
    assert (config.filters, config.way, config.shot, config.inner_steps) == (32, 20, 5, 3)
    assert (config.inner_lr, config.msl, config.data_dir) == (0.4, False, "/elsewhere")
    assert config.batch_size == 8
    # Evaluation takes as many steps as training unless told otherwise.
    assert config.eval_inner_steps == 3
    assert resolve("omniglot", inner_steps=3, eval_inner_steps=7).eval_inner_steps == 7


def test_unknown_dataset_raises_naming_the_flag():
    with pytest.raises(ValueError, match="--dataset") as raised:
        resolve("mini_imagenet_typo")
    assert "omniglot" in str(raised.value)


def test_json_round_trip():
    config = resolve("omniglot", way=20, shot=5, seed=3, second_order=False, bn_mode="running")
    text = config.to_json()
    assert json.loads(text)["way"] == 20
    assert ExperimentConfig.from_json(text) == config
    assert ExperimentConfig.from_json(text).to_json() == text


def test_total_iterations():
    assert resolve("omniglot", epochs=7, iters_per_epoch=11).total_iterations == 77


def test_architecture_differences_name_only_the_fields_that_break_checkpoints():
    config = resolve("omniglot")
    other = dataclasses.replace(config, way=20, filters=32, epochs=3, meta_lr=0.5, seed=9)
    assert sorted(config.architecture_differences(other)) == ["filters", "way"]
    assert config.architecture_differences(dataclasses.replace(config, epochs=1)) == []
