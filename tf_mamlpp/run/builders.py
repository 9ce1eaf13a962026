"""The library objects a run's configuration describes, built from its settings by name.

Each setting that configures an object says so in its field's metadata
(config.py, `configures`) and is passed to it as the keyword of its own name,
so adding a setting to the network, the schedule or the optimizer is one
field and one keyword: no mapping to keep in step here. `--backbone` names a
user's Keras model factory, which `KerasBackbone` wraps instead of the
built-in network.
"""

import importlib
import os
import sys

import keras

from tf_mamlpp.config_error import ConfigError
from tf_mamlpp.core.keras_backbone import KerasBackbone
from tf_mamlpp.core.network import MamlppNetwork
from tf_mamlpp.core.schedules import Schedule, meta_optimizer
from tf_mamlpp.run.config import BACKBONE, NETWORK, OPTIMIZER, SCHEDULE


def build_network(config):
    """The learner `config` describes: `MamlppNetwork`, or `KerasBackbone` of `--backbone`."""
    if config.backbone is None:
        return MamlppNetwork(image_shape=config.image_shape, **config.arguments_for(NETWORK))
    return KerasBackbone(backbone_model(config), **config.arguments_for(BACKBONE))


def build_schedule(config):
    """The MSL and DA `Schedule` that `config` describes."""
    return Schedule(**config.arguments_for(SCHEDULE))


def build_optimizer(config):
    """Adam with the cosine-annealed (CA) or constant meta-learning rate, over the whole run."""
    return meta_optimizer(total_iterations=config.total_iterations,
                          **config.arguments_for(OPTIMIZER))


def backbone_model(config):
    """The Keras model that `config.backbone`'s factory makes for the run's images and way.

    Raises:
      ConfigError: naming `backbone`, where the factory cannot be imported,
        raises, or returns anything but a model of (h, w, c) images to `way`
        logits.
    """
    spec = config.backbone
    factory = _factory(spec)
    try:
        model = factory(config.image_shape, config.way)
    except Exception as error:  # the user's code: any failure is reported as theirs
        raise ConfigError(f"backbone={spec}: the factory raised {type(error).__name__}: "
                          f"{error}", "backbone") from error
    if not isinstance(model, keras.Model):
        raise ConfigError(f"backbone={spec}: the factory returned {type(model).__name__}, not "
                          "a Keras model", "backbone")
    expected = ((None, *config.image_shape), (None, config.way))
    shapes = (tuple(model.input_shape), tuple(model.output_shape)) if model.built else None
    if shapes != expected:
        raise ConfigError(f"backbone={spec}: the model maps {shapes[0] if shapes else '?'} to "
                          f"{shapes[1] if shapes else '?'}, not {config.image_shape} images to "
                          f"{config.way} logits", "backbone")
    return model


def _factory(spec):
    """The function `spec` ("module:function") names, from the working directory or the path."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ConfigError(f"backbone={spec}: expected MODULE:FUNCTION, e.g. "
                          "tf_mamlpp.backbones:resnet12", "backbone")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # an import runs the user's module: any failure is theirs
        raise ConfigError(f"backbone={spec}: cannot import {module_name} "
                          f"({type(error).__name__}: {error})", "backbone") from error
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise ConfigError(f"backbone={spec}: {module_name} has no function {function_name}",
                          "backbone")
    return factory
