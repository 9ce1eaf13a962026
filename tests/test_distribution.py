"""tf.distribute: a replicated meta-step equals the single-device one.

Logical devices must be configured before TensorFlow starts, so each check
runs in a fresh Python process.
"""

import json
import os
import socket
import textwrap

import numpy as np
import pytest

from conftest import MainProcess, run_python

pytestmark = pytest.mark.slow

MIRRORED_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, tensorflow as tf, keras
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from tf_mamlpp.core.meta_learner import MetaLearner
    from tf_mamlpp.core.network import MamlppNetwork
    from tf_mamlpp.core.schedules import Phase
    from tf_mamlpp.data.random_tasks import random_tasks

    def one_step(strategy):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            network = MamlppNetwork(3, (8, 8, 1), 2, filters=4, num_stages=2)
            learner = MetaLearner(network, keras.optimizers.Adam(1e-2), strategy=strategy)
        batch = random_tasks(4, 3, 1, 2, image_shape=(8, 8, 1))
        figures = learner.meta_update(batch, Phase(tf.constant([0.5, 0.5]), True, True))
        # Keyed by position: a second network's variables get a new name prefix.
        return ({f"{i}:{v.name}": np.asarray(v.numpy()).tolist()
                 for i, v in enumerate(network.variables)},
                {k: float(v) for k, v in figures.items()})

    single = one_step(tf.distribute.get_strategy())
    mirrored = one_step(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    print(json.dumps({"single": single, "mirrored": mirrored}))
""")


def test_mirrored_step_on_two_devices_equals_single_device_step():
    completed = run_python("-c", MIRRORED_SCRIPT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    (single_vars, single_figures), (mirrored_vars, mirrored_figures) = (
        result["single"], result["mirrored"])
    assert single_vars.keys() == mirrored_vars.keys()
    for path in single_vars:
        np.testing.assert_allclose(mirrored_vars[path], single_vars[path], rtol=1e-5,
                                   atol=1e-6, err_msg=path)
    for name in ("loss", "accuracy", "gradient_norm", "update_norm"):
        assert mirrored_figures[name] == pytest.approx(single_figures[name], rel=1e-5)
    # The step moved the parameters: the comparison is not between two no-ops.
    assert single_figures["update_norm"] > 0


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_multi_worker_run_trains_checkpoints_from_chief_and_agrees(tmp_path):
    logdir = tmp_path / "runs"  # beside the workers' output files
    logdir.mkdir()
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    flags = ["--strategy=multi_worker", "--way=3", "--shot=1", "--inner_steps=1",
             "--filters=8", "--batch_size=4", "--epochs=1", "--iters_per_epoch=2",
             "--val_tasks=4", "--test_tasks=4", "--second_order=false",
             f"--logdir={logdir}", "--experiment=mw"]
    workers = []
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}})}
        workers.append(MainProcess(flags, output=tmp_path / f"worker{index}", env=env))
    try:
        for worker in workers:
            worker.wait(timeout=600)
    finally:
        for worker in workers:
            worker.popen.kill()
    for worker in workers:
        assert worker.popen.returncode == 0, worker.stderr[-3000:]
    fingerprints = [line for worker in workers for line in worker.stderr.splitlines()
                    if "parameter fingerprint" in line]
    assert len(fingerprints) == 2
    assert fingerprints[0].split("parameter fingerprint")[1] == \
        fingerprints[1].split("parameter fingerprint")[1]
    run_dir = logdir / "mw"
    assert json.loads((run_dir / "results.json").read_text())["test_tasks"] == 4
    # The default precision, auto, is float32 here: hosts probing alone could disagree.
    assert json.loads((run_dir / "config.json").read_text())["mixed_precision"] is False
    # Only the chief wrote: one directory, one set of event files.
    assert sorted(path.name for path in logdir.iterdir()) == ["mw"]
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
