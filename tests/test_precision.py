"""Specification of --mixed_precision=auto: the faster precision, measured once per machine and shape."""

import dataclasses
import json
import logging

import numpy as np
import pytest
import tensorflow as tf

from tf_mamlpp.config_error import ConfigError
from tf_mamlpp.core.mixed_precision import compute_dtype
from tf_mamlpp.run import precision
from tf_mamlpp.run.config import AUTO, resolve
from tf_mamlpp.hardware.machine import cpu_description
from tf_mamlpp.run.run_directory import RunDirectory
from tf_mamlpp.run.trainer import Trainer

TINY = dict(way=2, shot=1, filters=4, inner_steps=2)


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    """Each test's own cache folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def absl_log(caplog):
    caplog.set_level(logging.INFO, logger="absl")
    return caplog


@pytest.fixture
def probes(monkeypatch):
    """The configs probed, with made-up timings set per test in `probes.timings`."""
    calls = []

    def fake_probe(config):
        calls.append(config)
        return probes.timings

    monkeypatch.setattr(precision, "probe", fake_probe)
    probes = type("Probes", (), {"calls": calls, "timings": None})
    return probes


def cache_timings(config, float32, sixteen_bits, parallel_tasks=1):
    path = precision.cache_path()
    path.parent.mkdir(parents=True)
    key = precision.probe_key(config, parallel_tasks)
    path.write_text(json.dumps({key: {"float32": float32, "sixteen_bits": sixteen_bits,
                                      "sixteen_bit_dtype": compute_dtype().name}}))


@pytest.mark.parametrize("float32, sixteen_bits, mixed", [(0.2, 0.1, True), (0.1, 0.25, False)])
def test_auto_trains_in_the_faster_precision_and_logs_both_timings(
        absl_log, probes, float32, sixteen_bits, mixed):
    config = resolve("omniglot", mixed_precision=AUTO, **TINY)
    cache_timings(config, float32, sixteen_bits)
    assert precision.settled(config).mixed_precision is mixed
    assert probes.calls == []  # the cached timings were used
    (message,) = [record.getMessage() for record in absl_log.records if "auto" in
                  record.getMessage()]
    assert f"{float32:.4f} s in float32" in message
    assert f"{sixteen_bits:.4f} s in {compute_dtype().name}" in message
    assert ("meta-training in 16 bits" if mixed else "meta-training in float32") in message


@pytest.mark.parametrize("deterministic, multi_worker, reason", [
    (True, False, "--deterministic"), (False, True, "--strategy=multi_worker")])
def test_auto_where_a_probe_could_choose_differently_trains_in_float32_unprobed(
        absl_log, probes, deterministic, multi_worker, reason):
    config = resolve("omniglot", mixed_precision=AUTO, deterministic=deterministic, **TINY)
    assert precision.settled(config, multi_worker=multi_worker).mixed_precision is False
    assert probes.calls == []
    assert any(f"auto with {reason}: " in record.getMessage() and "in float32" in
               record.getMessage() for record in absl_log.records)


def test_a_forced_16_bit_run_warns_with_the_ratio_where_it_is_slower(absl_log, probes):
    config = resolve("omniglot", mixed_precision=True, **TINY)
    cache_timings(config, 0.1, 0.25)
    assert precision.settled(config).mixed_precision is True  # the user's choice stands
    (warning,) = [record for record in absl_log.records if record.levelno == logging.WARNING]
    assert "(0.40x), slower than float32" in warning.getMessage()


def test_a_forced_16_bit_run_that_is_faster_does_not_warn(absl_log, probes):
    config = resolve("omniglot", mixed_precision=True, **TINY)
    cache_timings(config, 0.3, 0.2)
    precision.settled(config)
    assert not [record for record in absl_log.records if record.levelno >= logging.WARNING]


def test_a_resumed_auto_run_keeps_its_precision_unprobed(absl_log, probes):
    config = resolve("omniglot", mixed_precision=AUTO, **TINY)
    for began in (True, False):
        previous = dataclasses.replace(config, mixed_precision=began)
        assert precision.settled(config, previous).mixed_precision is began
    assert probes.calls == []
    assert "continues in float32, as it began" in absl_log.records[-1].getMessage()


def test_float32_needs_no_probe(probes):
    config = resolve("omniglot", mixed_precision=False, **TINY)
    assert precision.settled(config) is config
    assert probes.calls == []


def test_the_probe_times_both_precisions_and_is_cached_per_machine_and_shape(monkeypatch):
    config = resolve("omniglot", mixed_precision=AUTO, **TINY)
    assert isinstance(precision.settled(config, parallel_tasks=2).mixed_precision, bool)
    (key, timings), = json.loads(precision.cache_path().read_text()).items()
    assert json.loads(key)["machine"] == (
        cpu_description() if not tf.config.list_physical_devices("GPU") else json.loads(
            key)["machine"])
    assert {name: json.loads(key)[name] for name in ("way", "shot", "filters", "parallel_tasks",
                                                     "second_order")} == {
        "way": 2, "shot": 1, "filters": 4, "parallel_tasks": 2, "second_order": False}
    assert timings["float32"] > 0 and timings["sixteen_bits"] > 0
    assert timings["sixteen_bit_dtype"] == compute_dtype().name
    # The same machine and shape: no second probe. Another shape: its own.
    probed = []
    monkeypatch.setattr(precision, "probe", lambda config: probed.append(config) or
                        precision.Timings(1.0, 2.0, "bfloat16"))
    precision.settled(config, parallel_tasks=2)
    assert probed == []
    assert precision.settled(dataclasses.replace(config, way=3),
                             parallel_tasks=2).mixed_precision is False
    assert len(probed) == 1 and len(json.loads(precision.cache_path().read_text())) == 2
    # Another oneDNN setting, whose kernels differ: its own.
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    precision.settled(config, parallel_tasks=2)
    assert len(probed) == 2


def test_an_unreadable_cache_is_probed_again_and_rewritten(probes):
    config = resolve("omniglot", mixed_precision=AUTO, **TINY)
    precision.cache_path().parent.mkdir(parents=True)
    precision.cache_path().write_text("{not json")
    probes.timings = precision.Timings(0.2, 0.1, "bfloat16")
    assert precision.settled(config).mixed_precision is True
    assert len(probes.calls) == 1
    assert json.loads(precision.cache_path().read_text())[precision.probe_key(config, 1)][
        "sixteen_bits"] == 0.1


def test_a_cache_that_cannot_be_written_costs_only_a_warning(tmp_path, monkeypatch, absl_log,
                                                             probes):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # a file where the folder would be
    probes.timings = precision.Timings(0.1, 0.2, "bfloat16")
    config = resolve("omniglot", mixed_precision=AUTO, **TINY)
    assert precision.settled(config).mixed_precision is False
    assert any("the next run probes again" in record.getMessage() for record in absl_log.records)


def test_the_trainer_refuses_an_undecided_precision(tmp_path):
    config = resolve("omniglot", mixed_precision=AUTO, **TINY)
    with pytest.raises(ConfigError, match="mixed_precision=auto must be decided"):
        Trainer(config, RunDirectory.open(tmp_path, "run", dataclasses.replace(
            config, mixed_precision=False)))


@pytest.mark.parametrize("dtype", [tf.float32, compute_dtype()], ids=lambda dtype: dtype.name)
def test_each_probe_step_convolves_in_the_precision_it_times(dtype):
    """The probe compares the two precisions only if each step computes in its own."""
    config = resolve("omniglot", **TINY)
    network = precision.build_network(dataclasses.replace(config, inner_steps=1))
    phase = precision.Phase(np.ones(1, np.float32), multi_step=False, second_order=False)
    step = precision._meta_gradient_norm(network, phase, dtype)
    graph = step.get_concrete_function(precision._probe_task(config)).graph
    kinds = {op.get_attr("T") for op in graph.get_operations() if op.type == "Conv2D"}
    assert kinds == {dtype}
