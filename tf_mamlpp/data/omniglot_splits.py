"""Omniglot's counts: drawings per character, and the characters of each split under either scheme.

The one place these counts are kept: omniglot.split_classes draws each
split's classes with them, and preflight.py checks the way setting against them before
TensorFlow loads, which is why this module imports none of it.
"""

from tf_mamlpp.config_error import ConfigError

BACKGROUND_CLASSES = 964  # images_background's characters come first,
CLASSES = 1623  # then images_evaluation's 659
MAMLPP_TRAIN_CLASSES = 1150
VALIDATION_CLASSES = 50
IMAGES_PER_CLASS = 20  # drawings of each character


def split_sizes(scheme, num_background=BACKGROUND_CLASSES, num_classes=CLASSES):
    """Classes per split, {"train", "val", "test"} in that order.

    Schemes:
      mamlpp: as the MAML++ reference code (Antoniou et al. 2019): 1150
        train, 50 validation, the rest (423) test, drawn from all classes.
      lake: the background classes less 50 train (914), those 50
        validation; the evaluation classes (659) test, as Lake et al.

    Args:
      scheme: "mamlpp" or "lake" (the omniglot_split setting).
      num_background: classes from images_background (the first ones).
      num_classes: all classes.

    Raises:
      ConfigError: an unknown scheme, or too few classes for it, naming omniglot_split.
    """
    if scheme == "mamlpp":
        if num_classes <= MAMLPP_TRAIN_CLASSES + VALIDATION_CLASSES:
            raise ConfigError(f"omniglot_split=mamlpp needs over "
                              f"{MAMLPP_TRAIN_CLASSES + VALIDATION_CLASSES} classes, got "
                              f"{num_classes}", "omniglot_split")
        train = MAMLPP_TRAIN_CLASSES
    elif scheme == "lake":
        if not VALIDATION_CLASSES < num_background < num_classes:
            raise ConfigError(f"omniglot_split=lake needs over {VALIDATION_CLASSES} "
                              f"background classes and some evaluation ones, got "
                              f"{num_background} of {num_classes}", "omniglot_split")
        train = num_background - VALIDATION_CLASSES
    else:
        raise ConfigError(f"omniglot_split={scheme!r} is not one of 'mamlpp', 'lake'",
                          "omniglot_split")
    return {"train": train, "val": VALIDATION_CLASSES,
            "test": num_classes - train - VALIDATION_CLASSES}
