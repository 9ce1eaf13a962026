"""The batch-norm modes: how a target (query) batch is normalised; TaskNorm-I's options.

Kept free of TensorFlow so that the command line can offer the choices
before TensorFlow loads; per_step_batch_norm.py implements them.
"""

from tf_mamlpp.config_error import ConfigError

BN_MODES = ("transductive", "support", "task_norm", "running")
TRANSDUCTIVE, SUPPORT, TASK_NORM, RUNNING = BN_MODES

# What a model trained in each mode normalises its queries with once
# deployed: a transductive model is served with the support statistics, so
# that no answer depends on the other queries.
SERVING_MODES = {TRANSDUCTIVE: SUPPORT, SUPPORT: SUPPORT, TASK_NORM: TASK_NORM, RUNNING: RUNNING}

# The mode of main.py and the library when none is chosen (README, "Default").
DEFAULT_MODE = SUPPORT


def evaluation_modes(bn_mode):
    """The modes a model trained in `bn_mode` is scored in: its own, then its export's.

    A transductive model is exported to normalise its queries with the
    support statistics, so it is scored both ways; the first figure ranks.
    """
    return list(dict.fromkeys([bn_mode, SERVING_MODES[bn_mode]]))


def check_mode(mode):
    if mode not in BN_MODES:
        raise ValueError(f"unknown batch-norm mode {mode!r}; expected one of {', '.join(BN_MODES)}")
    return mode


# TaskNorm-I's blend weight alpha (`task_norm_alpha`): sigmoid(a * support size + b) per
# layer, as the paper; sigmoid(w) per layer, as its Appendix E for a fixed support size;
# sigmoid(w_i) per layer and weight state i; or n / (n + 1) for n support images, not
# learned (Reptile's normalisation, RN).
TASK_NORM_ALPHAS = ("size", "direct", "per_step", "reptile")
SIZE_ALPHA, DIRECT_ALPHA, PER_STEP_ALPHA, REPTILE_ALPHA = TASK_NORM_ALPHAS


# Where a learned alpha starts: at RN's n / (n + 1), its logit offset by log n so that
# zero weights give RN's blend at any support size; or at 1/2, as the TaskNorm paper.
TASK_NORM_STARTS = ("reptile", "half")
REPTILE_START, HALF_START = TASK_NORM_STARTS


def check_task_norm_alpha(alpha):
    """`alpha`, refused (naming `task_norm_alpha`) unless it is one of TASK_NORM_ALPHAS."""
    if alpha not in TASK_NORM_ALPHAS:
        raise ConfigError(f"task_norm_alpha={alpha!r}: must be one of "
                          f"{', '.join(TASK_NORM_ALPHAS)}", "task_norm_alpha")
    return alpha


def check_task_norm_start(start):
    """`start`, refused (naming `task_norm_start`) unless it is one of TASK_NORM_STARTS."""
    if start not in TASK_NORM_STARTS:
        raise ConfigError(f"task_norm_start={start!r}: must be one of "
                          f"{', '.join(TASK_NORM_STARTS)}", "task_norm_start")
    return start


def check_task_norm_options(bn_mode, task_norm_alpha, task_norm_unbiased, task_norm_start):
    """Refuses an unknown alpha or start, a start where nothing is learned, and TaskNorm
    options other than the defaults outside TASK_NORM.

    Raises:
      ConfigError: naming the settings.
    """
    check_task_norm_alpha(task_norm_alpha)
    check_task_norm_start(task_norm_start)
    if task_norm_alpha == REPTILE_ALPHA and task_norm_start != REPTILE_START:
        raise ConfigError(f"task_norm_start={task_norm_start} conflicts with "
                          f"task_norm_alpha={REPTILE_ALPHA}, whose alpha is fixed at n / (n + 1)",
                          "task_norm_start", "task_norm_alpha")
    changed = {name: value for name, value, default in (
        ("task_norm_alpha", task_norm_alpha, SIZE_ALPHA),
        ("task_norm_unbiased", task_norm_unbiased, False),
        ("task_norm_start", task_norm_start, REPTILE_START)) if value != default}
    if changed and bn_mode != TASK_NORM:
        settings = " ".join(f"{name}={value}" for name, value in changed.items())
        raise ConfigError(f"{settings} conflicts with bn_mode={bn_mode}; it applies to "
                          f"bn_mode={TASK_NORM} only", *changed, "bn_mode")
