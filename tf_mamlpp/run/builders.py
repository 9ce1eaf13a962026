"""The library objects a run's configuration describes, built from its settings by name.

Each setting that configures an object says so in its field's metadata
(config.py, `configures`) and is passed to it as the keyword of its own name,
so adding a setting to the network, the schedule or the optimizer is one
field and one keyword: no mapping to keep in step here.
"""

from tf_mamlpp.core.network import MamlppNetwork
from tf_mamlpp.core.schedules import Schedule, meta_optimizer
from tf_mamlpp.run.config import NETWORK, OPTIMIZER, SCHEDULE


def build_network(config):
    """The `MamlppNetwork` that `config` describes."""
    return MamlppNetwork(image_shape=config.image_shape, **config.arguments_for(NETWORK))


def build_schedule(config):
    """The MSL and DA `Schedule` that `config` describes."""
    return Schedule(**config.arguments_for(SCHEDULE))


def build_optimizer(config):
    """Adam with the cosine-annealed (CA) or constant meta-learning rate, over the whole run."""
    return meta_optimizer(total_iterations=config.total_iterations,
                          **config.arguments_for(OPTIMIZER))
