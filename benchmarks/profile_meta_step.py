"""Where the time of a meta-iteration goes: op time by kind and by pass.

    python -m benchmarks.profile_meta_step --way=20 --shot=5
    python -m benchmarks.profile_meta_step --way=20 --nosecond_order --bn_mode=task_norm

Profiles a few meta-iterations of the paper's step (random Omniglot-sized
images, batch 8, 5 inner steps, multi-step loss) with the TensorFlow profiler
and sums the time of every op, over all threads, into kinds (convolutions,
batch norm, pooling, element-wise ops and reductions, ...) and passes. The
pass follows from the op's name: GradientTape names each gradient op
"gradient_tape/<forward op>", so a name without that prefix is a forward
op (support and target passes of the inner loop, and the optimizer), one
prefix a first derivative (the inner gradients, and the outer backward
through the forward passes) and two a second derivative (the outer backward
through the inner gradients: what second order adds). The derivatives of
batch norm and of ReLU with max-pooling are custom gradients, which that
naming does not reach; they carry name scopes of their own. The AddN ops
that sum a tensor's gradients are named after no forward op and get a line
of their own.
"""

import collections
import glob
import tempfile

from absl import app, flags

from tf_mamlpp.core.batch_norm_modes import BN_MODES

FLAGS = flags.FLAGS
flags.DEFINE_integer("way", 5, "Classes per task. Default 5.")
flags.DEFINE_integer("shot", 1, "Support images per class. Default 1.")
flags.DEFINE_bool("second_order", True, "Second-order meta-gradients. Default true.")
flags.DEFINE_integer("iterations", 3, "Profiled meta-iterations after two warm-up ones. Default 3.")
flags.DEFINE_integer("top", 15, "Op types listed. Default 15.")
flags.DEFINE_enum("bn_mode", "transductive", BN_MODES, "Batch-norm mode, as main.py's "
                  "--bn_mode. Default transductive.")

GRADIENT_SUMS = "gradient accumulation (AddN, AssignAdd)"
# Op kind: substrings of TensorFlow op types (oneDNN's _MklNative* included).
KINDS = [
    ("convolutions", ("Conv2D",)),
    ("batch norm kernels", ("FusedBatchNorm",)),
    ("max-pool and its gradients", ("Pool",)),
    (GRADIENT_SUMS, ("AddN", "AssignAdd", "Assign", "TemporaryVariable")),
    ("ReLU gradients", ("ReluGrad", "LeakyReluGrad")),
    ("head matmul", ("MatMul",)),
    ("element-wise ops and reductions", ("Mul", "Sub", "Add", "Sum", "Mean", "Neg", "Tile",
                                         "Square", "Rsqrt", "RealDiv", "Relu", "Cast")),
]
PASSES = ["forward passes and the optimizer", "first derivatives", "second derivatives"]


def kind_of(op_type):
    for kind, patterns in KINDS:
        if any(pattern in op_type for pattern in patterns):
            return kind
    return "other"


def pass_of(op_name, op_type):
    from tf_mamlpp.ops import batch_norm_kernel, max_pool_kernel
    if kind_of(op_type) == GRADIENT_SUMS:  # named after no forward op
        return "sums of a tensor's gradients from its uses"
    for kernel in (batch_norm_kernel, max_pool_kernel):
        if kernel.SECOND_DERIVATIVE_SCOPE in op_name:
            return PASSES[2]
        if kernel.FIRST_DERIVATIVE_SCOPE in op_name:
            return PASSES[1]
    return PASSES[min(op_name.count("gradient_tape/"), 2)]


def op_events(trace_dir):
    """(op name, op type, seconds) of every TensorFlow op event in a profiler trace."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    space = xplane_pb2.XSpace()
    path, = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    with open(path, "rb") as trace:
        space.ParseFromString(trace.read())
    for plane in space.planes:
        for line in plane.lines:
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                # TensorFlow op events are named "op_name:OpType"; executor
                # and runtime events ("ExecutorState::Process", ...) are not.
                if ":" in name and "::" not in name and " " not in name:
                    op_name, op_type = name.rsplit(":", 1)
                    yield op_name, op_type, event.duration_ps / 1e12


def profile(way, shot, second_order, iterations, bn_mode):
    import keras
    import numpy as np
    import tensorflow as tf
    from benchmarks.random_tasks import BATCH_SIZE, INNER_STEPS, QUERY
    from tf_mamlpp.core.meta_learner import MetaLearner
    from tf_mamlpp.core.network import MamlppNetwork
    from tf_mamlpp.core.schedules import Phase
    from tf_mamlpp.data.random_tasks import random_tasks
    from tf_mamlpp.hardware import cpu_threads

    parallel_tasks = cpu_threads.default_parallel_tasks()
    cpu_threads.configure(parallel_tasks)  # as main.py does
    network = MamlppNetwork(way, (28, 28, 1), INNER_STEPS, bn_mode=bn_mode)
    learner = MetaLearner(network, keras.optimizers.Adam(1e-3),
                          parallel_tasks=parallel_tasks)
    batch = random_tasks(BATCH_SIZE, way, shot, QUERY)
    phase = Phase(tf.constant(np.full(INNER_STEPS, 1 / INNER_STEPS, np.float32)),
                  multi_step=True, second_order=second_order)
    step = lambda: float(learner.meta_update(batch, phase)["loss"])
    step(), step()
    trace_dir = tempfile.mkdtemp(prefix="meta_step_profile_")
    tf.profiler.experimental.start(trace_dir)
    for _ in range(iterations):
        step()
    tf.profiler.experimental.stop()
    return list(op_events(trace_dir))


def print_shares(title, seconds):
    total = sum(seconds.values())
    print(f"\n| {title} | op seconds per iteration | share |\n| --- | --- | --- |")
    for name, value in sorted(seconds.items(), key=lambda item: -item[1]):
        print(f"| {name} | {value:.3f} | {value / total:.0%} |")


def main(argv):
    del argv
    events = profile(FLAGS.way, FLAGS.shot, FLAGS.second_order, FLAGS.iterations, FLAGS.bn_mode)
    by_kind, by_pass, by_type = (collections.Counter() for _ in range(3))
    for op_name, op_type, seconds in events:
        seconds /= FLAGS.iterations
        by_kind[kind_of(op_type)] += seconds
        by_pass[pass_of(op_name, op_type)] += seconds
        by_type[op_type] += seconds
    order = "second" if FLAGS.second_order else "first"
    print(f"{FLAGS.way}-way {FLAGS.shot}-shot, {order} order, {FLAGS.bn_mode} batch norm: "
          f"op time summed over all threads, mean of {FLAGS.iterations} iterations")
    print_shares("kind", by_kind)
    print_shares("pass", by_pass)
    print_shares("op type", dict(by_type.most_common(FLAGS.top)))


if __name__ == "__main__":
    app.run(main)
