"""The paper's PyTorch MAML++ step, timed beside this project's (meta_iteration.py).

    python -m benchmarks.meta_iteration --reference_dir=PATH

PATH is a checkout of the paper's reference implementation,
https://github.com/AntreasAntoniou/HowToTrainYourMAMLPytorch (PyTorch; it is
not part of this project). Its training step, MAMLFewShotClassifier's
run_train_iter, is timed as its own experiments run it, so that it can be set
beside this project's figures taken in the same run on the same machine.

The settings are the reference's Omniglot MAML++ configurations
(experiment_config/omniglot_maml++-omniglot_<shot>_8_0.1_64_<way>_0.json, with
its parser's defaults for what they leave out): 8 tasks per meta-batch, 5
inner steps, 4 stages of 64 3x3 filters with max pooling, per-step batch-norm
weights, biases and running statistics, learnable per-layer per-step inner
learning rates, 1 target image per class, on the CPU. Every timed iteration
is epoch 0: the reference then uses the multi-step loss on all 5 steps with
equal weights (epoch < multi_step_loss_num_epochs), as meta_iteration.py does,
and second order (epoch > first_order_to_second_order_epoch = -1) unless the
configuration is first order. Random images stand in for Omniglot, in the
batch format of the reference's data loader.

meta_iteration.py runs each configuration in its own subprocess, so its
peak resident memory is its own. PyTorch keeps its default threads (one per
core). PyTorch is not a dependency of this project: install it to compare.
"""

import os
import sys

from benchmarks.measurement import peak_gb, time_step
from benchmarks.random_tasks import BATCH_SIZE, CONFIGS, INNER_STEPS, QUERY

# The fields of the reference's Omniglot MAML++ configuration files that its
# model reads, and its parser's defaults (utils/parser_utils.py) for the rest.
PAPER_ARGS = {
    "batch_size": BATCH_SIZE,
    "image_height": 28,
    "image_width": 28,
    "image_channels": 1,
    "dataset_name": "omniglot",
    "seed": 104,
    "num_target_samples": QUERY,
    "number_of_training_steps_per_iter": INNER_STEPS,
    "number_of_evaluation_steps_per_iter": INNER_STEPS,
    "multi_step_loss_num_epochs": 10,
    "use_multi_step_loss_optimization": True,
    "first_order_to_second_order_epoch": -1,
    "learnable_per_layer_per_step_inner_loop_learning_rate": True,
    "enable_inner_loop_optimizable_bn_params": False,
    "task_learning_rate": 0.1,
    "meta_learning_rate": 0.001,
    "min_learning_rate": 0.00001,
    "total_epochs": 100,
    "norm_layer": "batch_norm",
    "per_step_bn_statistics": True,
    "learnable_bn_gamma": True,
    "learnable_bn_beta": True,
    "max_pooling": True,
    "conv_padding": True,
    "cnn_num_filters": 64,
    "num_stages": 4,
    "cnn_blocks_per_stage": 1,
    "dropout_rate_value": 0.0,
    "use_cuda": False,
    "use_gpu": False,
}


def measure(name, iterations, reference_dir):
    """Times one configuration in this process; returns a dict of figures."""
    import contextlib
    import types

    import numpy as np
    import torch

    sys.path.insert(0, reference_dir)
    from few_shot_learning_system import MAMLFewShotClassifier

    way, shot, second_order = CONFIGS[name]
    args = types.SimpleNamespace(**PAPER_ARGS, num_classes_per_set=way,
                                 num_samples_per_class=shot, second_order=second_order)
    # The reference prints its layers while it builds them; keep stdout for the result.
    with contextlib.redirect_stdout(sys.stderr):
        model = MAMLFewShotClassifier(im_shape=(2, 1, 28, 28), device=torch.device("cpu"),
                                      args=args)

    # As its data loader yields them: images (batch, way, shot, c, h, w) and
    # float labels (batch, way, shot), every class's images together.
    rng = np.random.default_rng(0)

    def images(per_class):
        return torch.from_numpy(rng.random((BATCH_SIZE, way, per_class, 1, 28, 28), np.float32))

    def labels(per_class):
        return torch.from_numpy(np.tile(np.arange(way, dtype=np.float32)[:, None],
                                        (BATCH_SIZE, 1, per_class)))

    batch = (images(shot), images(QUERY), labels(shot), labels(QUERY))
    epoch = 0
    assert epoch < args.multi_step_loss_num_epochs  # the multi-step loss on every step
    assert (args.second_order and epoch > args.first_order_to_second_order_epoch) == second_order

    def step():
        losses, _ = model.run_train_iter(data_batch=batch, epoch=epoch)
        return float(losses["loss"].detach())

    first_call, seconds = time_step(step, iterations)
    return {"seconds": seconds, "first_call": first_call, "peak_gb": peak_gb(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def check_checkout(reference_dir):
    """The absolute path of a checkout of the reference implementation.

    Raises:
      ValueError: naming the flag, when `reference_dir` holds no few_shot_learning_system.py.
    """
    if not os.path.isfile(os.path.join(reference_dir, "few_shot_learning_system.py")):
        raise ValueError(f"--reference_dir={reference_dir} is not a checkout of "
                         "HowToTrainYourMAMLPytorch (no few_shot_learning_system.py there)")
    return os.path.abspath(reference_dir)
