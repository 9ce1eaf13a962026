"""The benchmarks' input: the paper's configurations, measured on random tasks.

The step's cost does not depend on the pixels, so random images
(tf_mamlpp.data.random_tasks) stand in for the data and keep the episode
pipeline out of the measurement. This module stays free of TensorFlow:
benchmark parents, which only read the constants, cannot then raise their
children's peak memory.
"""

# The paper's Omniglot meta-batch: 8 tasks, 5 inner steps, 1 target image per class.
BATCH_SIZE, INNER_STEPS, QUERY = 8, 5, 1

# The configurations measured, name: (way, shot, second order).
CONFIGS = {
    "20-way 1-shot": (20, 1, True),
    "20-way 5-shot": (20, 5, True),
    "5-way 1-shot": (5, 1, True),
    "5-way 1-shot first order": (5, 1, False),
}

# The paper's PyTorch implementation on these 2-core machines, as quoted when
# the benchmarks were specified: seconds per meta-iteration, peak GB.
# reference_maml.py measures it again on the machine at hand.
QUOTED_REFERENCE = {
    "20-way 1-shot": (2.8, 2.5),
    "20-way 5-shot": (10.8, 7.4),
    "5-way 1-shot": (1.03, 1.0),
    "5-way 1-shot first order": (0.55, 0.7),
}


def config_names(flag_value):
    """The configurations a --configs flag names (_ for spaces), all of them if unset.

    Raises:
      ValueError: naming the unknown configuration and the known ones.
    """
    names = [name.replace("_", " ") for name in flag_value] if flag_value else list(CONFIGS)
    unknown = [name for name in names if name not in CONFIGS]
    if unknown:
        raise ValueError(f"--configs: unknown configuration {unknown[0].replace(' ', '_')!r}; "
                         f"known: {', '.join(name.replace(' ', '_') for name in CONFIGS)}")
    return names
