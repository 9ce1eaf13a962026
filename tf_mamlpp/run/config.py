"""The resolved configuration of a run, and the paper's defaults per dataset.

Flags left unset take the value that Antoniou et al. (2019) use for the
dataset; the resolved configuration is logged at start and saved with the run,
so a run records exactly what it did.
"""

import dataclasses
import json
import os

# The data shipped with the project, found wherever the command is run from.
SHIPPED_DATA = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "datasets")

# Per-dataset settings of the paper (section 5) and its reference implementation.
# Mini-ImageNet cannot be shipped (ImageNet's licence): its data_dir is where
# a user is told to put it. "folder" (any folder of class folders) takes the
# paper's natural-image settings, with the channels read from the images
# (None) and no data_dir (--data_dir is required).
PAPER_DEFAULTS = {
    "omniglot": {"filters": 64, "batch_size": 8, "query": 1, "inner_lr": 0.1,
                 "image_size": 28, "channels": 1, "augment": True,
                 "data_dir": os.path.join(SHIPPED_DATA, "omniglot")},
    "mini_imagenet": {"filters": 48, "batch_size": 2, "query": 15, "inner_lr": 0.01,
                      "inner_steps": 5, "image_size": 84, "channels": 3, "augment": False,
                      "data_dir": os.path.join(SHIPPED_DATA, "mini_imagenet")},
    "folder": {"filters": 48, "batch_size": 2, "query": 15, "inner_lr": 0.01,
               "inner_steps": 5, "image_size": 84, "channels": None, "augment": False,
               "data_dir": None},
}

# Settings that change the network, the task or what an iteration count means,
# so a checkpoint of one run cannot continue under another. Mixed precision
# adds the loss scale to the checkpoint and changes the arithmetic of training.
ARCHITECTURE_FIELDS = ("dataset", "way", "shot", "filters", "num_stages", "inner_steps",
                       "image_size", "channels", "bnrs", "bnwb", "lslr", "iters_per_epoch",
                       "batch_size", "mixed_precision", "bn_mode")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything a run depends on; see main.py's flags for each field's meaning."""

    dataset: str = "omniglot"
    data_dir: str = "datasets/omniglot"
    omniglot_split: str = "mamlpp"
    way: int = 5
    shot: int = 1
    query: int = 1
    batch_size: int = 8
    image_size: int = 28
    channels: int = 1
    augment: bool = True
    split_ratios: str | None = None
    in_memory_limit_gb: float = 4.0
    filters: int = 64
    num_stages: int = 4
    inner_steps: int = 5
    eval_inner_steps: int = 5
    inner_lr: float = 0.1
    meta_lr: float = 1e-3
    min_meta_lr: float = 1e-5
    epochs: int = 100
    iters_per_epoch: int = 500
    msl: bool = True
    msl_epochs: int = 10
    da: bool = True
    first_order_epochs: int = 50
    second_order: bool = True
    bnrs: bool = True
    bnwb: bool = True
    lslr: bool = True
    ca: bool = True
    bn_mode: str = "transductive"
    val_tasks: int = 600
    test_tasks: int = 600
    seed: int = 0
    mixed_precision: bool = False

    @property
    def total_iterations(self):
        return self.epochs * self.iters_per_epoch

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text):
        return cls(**json.loads(text))

    def architecture_differences(self, other):
        """Names of the fields that make `other`'s checkpoints unusable by this run."""
        return [name for name in ARCHITECTURE_FIELDS
                if getattr(self, name) != getattr(other, name)]


def resolve(dataset, **overrides):
    """Builds a config from the dataset's paper defaults and explicit values.

    Args:
      dataset: a key of PAPER_DEFAULTS.
      **overrides: field values; None means "the paper's default".

    Raises:
      ValueError: for an unknown dataset, naming --dataset.
    """
    if dataset not in PAPER_DEFAULTS:
        raise ValueError(
            f"--dataset={dataset!r} is unknown; choose one of {', '.join(sorted(PAPER_DEFAULTS))}")
    values = {**PAPER_DEFAULTS[dataset],
              **{name: value for name, value in overrides.items() if value is not None}}
    values.setdefault("eval_inner_steps", values.get("inner_steps", ExperimentConfig.inner_steps))
    return ExperimentConfig(dataset=dataset, **values)
