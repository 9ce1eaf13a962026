"""tf_mamlpp: MAML++ (Antoniou et al., "How to Train Your MAML", ICLR 2019) as a library.

    import tf_mamlpp
    learner = tf_mamlpp.MetaLearner(tf_mamlpp.KerasBackbone(my_model, inner_steps=5))
    learner.fit(episodes, epochs=100, steps_per_epoch=500)

See README.md, "Use it as a library". Names load on first use, so that
importing the package (as the command line does before checking its flags)
does not load TensorFlow.

On an AVX2 CPU, set TF_ENABLE_ONEDNN_OPTS=1 before TensorFlow loads for
oneDNN's faster kernels, as main.py does (tf_mamlpp/hardware/onednn.py).
"""

import importlib

_HOMES = {
    # The learners and the method.
    "MamlppNetwork": "tf_mamlpp.core.network",
    "KerasBackbone": "tf_mamlpp.core.keras_backbone",
    "conv4": "tf_mamlpp.backbones",
    "resnet12": "tf_mamlpp.backbones",
    "FastWeightsModel": "tf_mamlpp.core.fast_weights",
    "MetaLearner": "tf_mamlpp.core.meta_learner",
    "FollowSchedule": "tf_mamlpp.core.meta_learner",
    "meta_step": "tf_mamlpp.core.meta_step",
    "outer_loss": "tf_mamlpp.core.meta_step",
    "adapt": "tf_mamlpp.core.inner_loop",
    "adapt_and_evaluate": "tf_mamlpp.core.inner_loop",
    "Schedule": "tf_mamlpp.core.schedules",
    "meta_optimizer": "tf_mamlpp.core.schedules",
    "BN_MODES": "tf_mamlpp.core.batch_norm_modes",
    # Episodes.
    "EpisodeSpec": "tf_mamlpp.data.episodes",
    "episode_dataset": "tf_mamlpp.data.episodes",
    "from_class_arrays": "tf_mamlpp.data.class_images",
    "load_omniglot": "tf_mamlpp.data.omniglot",
    "load_tfds": "tf_mamlpp.data.tfds_images",
    "split_classes": "tf_mamlpp.data.omniglot",
    "num_background_classes": "tf_mamlpp.data.omniglot",
    # Results as the paper reports them, and the SavedModel.
    "mean_and_interval": "tf_mamlpp.core.evaluation",
    "export": "tf_mamlpp.serving.saved_model",
}

__all__ = sorted(_HOMES)


def __getattr__(name):
    if name not in _HOMES:
        raise AttributeError(f"module 'tf_mamlpp' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)


def __dir__():
    return __all__
