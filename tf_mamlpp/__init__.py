"""tf_mamlpp: MAML++ (Antoniou et al., "How to Train Your MAML", ICLR 2019) as a library.

    import tf_mamlpp
    learner = tf_mamlpp.MetaLearner(tf_mamlpp.KerasBackbone(my_model, num_steps=5))
    learner.fit(episodes, epochs=100, steps_per_epoch=500)

See README.md, "Use it as a library". Names load on first use, so that
importing the package (as the command line does before checking its flags)
does not load TensorFlow.

Importing the package before TensorFlow turns oneDNN's CPU kernels on
(`TF_ENABLE_ONEDNN_OPTS=1`, unless the variable is already set): TensorFlow
enables them by itself only on CPUs with AVX-512 VNNI or BF16 or AMX, and on
an AVX2 CPU they made the meta-step up to 1.5x faster (README, "Speed on one
device").
"""

import importlib
import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

_HOMES = {
    # The learners and the method.
    "MamlppNetwork": "tf_mamlpp.core.network",
    "KerasBackbone": "tf_mamlpp.core.keras_backbone",
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
    "split_classes": "tf_mamlpp.data.omniglot",
    "num_background_classes": "tf_mamlpp.data.omniglot",
    # Results as the paper reports them, and the SavedModel.
    "mean_and_interval": "tf_mamlpp.run.evaluation",
    "export": "tf_mamlpp.run.export",
}
_RENAMED = {"BN_MODES": "MODES"}

__all__ = sorted(_HOMES)


def __getattr__(name):
    if name not in _HOMES:
        raise AttributeError(f"module 'tf_mamlpp' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), _RENAMED.get(name, name))


def __dir__():
    return __all__
