"""Where the time of a meta-iteration goes: op time by kind and by phase.

    python benchmarks/profile_meta_step.py --way=20 --shot=5

Profiles a few meta-iterations of main.py's default step (random Omniglot-sized
images, batch 8, 5 inner steps, multi-step loss) with the TensorFlow profiler
and sums the time of every op, over all threads, into kinds (convolutions,
batch norm, pooling, element-wise ops and reductions, ...) and phases: the
inner loop (adaptation: support forward passes and inner gradients, target
forward passes), the outer backward (the meta-gradient through all of it)
and the rest (optimizer, batch-norm bank updates). The phases come from the
name scopes the meta-learner opens.
"""

import collections
import glob
import tempfile

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("way", 5, "Classes per task. Default 5.")
flags.DEFINE_integer("shot", 1, "Support images per class. Default 1.")
flags.DEFINE_bool("second_order", True, "Second-order meta-gradients. Default true.")
flags.DEFINE_integer("iterations", 3, "Profiled meta-iterations after two warm-up ones. Default 3.")
flags.DEFINE_integer("top", 15, "Op types listed. Default 15.")

# Op kind: substrings of TensorFlow op types (oneDNN's _MklNative* included).
KINDS = [
    ("convolutions", ("Conv2D",)),
    ("batch norm kernels", ("FusedBatchNorm",)),
    ("max-pool and its gradients", ("MaxPool",)),
    ("gradient accumulation (AddN, AssignAdd)", ("AddN", "AssignAdd", "Assign",
                                                   "TemporaryVariable")),
    ("ReLU gradients", ("ReluGrad",)),
    ("head matmul", ("MatMul",)),
    ("element-wise ops and reductions", ("Mul", "Sub", "Add", "Sum", "Mean", "Neg", "Tile",
                                         "Square", "Rsqrt", "RealDiv", "Relu", "Cast")),
]
PHASES = [("outer backward", "outer_backward"), ("inner loop", "inner_loop")]


def kind_of(op_type):
    for kind, patterns in KINDS:
        if any(pattern in op_type for pattern in patterns):
            return kind
    return "other"


def phase_of(op_name):
    for phase, scope in PHASES:
        if scope in op_name:
            return phase
    return "optimizer and the rest"


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


def profile(way, shot, second_order, iterations):
    import keras
    import numpy as np
    import tensorflow as tf
    from random_tasks import BATCH_SIZE, INNER_STEPS, QUERY, random_batch
    from tf_mamlpp import cpu_threads
    from tf_mamlpp.meta_learner import MetaLearner
    from tf_mamlpp.network import MamlppNetwork

    parallel_tasks = cpu_threads.default_parallel_tasks()
    cpu_threads.configure(parallel_tasks)  # as main.py does
    network = MamlppNetwork(way, (28, 28, 1), INNER_STEPS)
    learner = MetaLearner(network, keras.optimizers.Adam(1e-3), BATCH_SIZE,
                          parallel_tasks=parallel_tasks)
    batch = random_batch(way, shot, QUERY, BATCH_SIZE)
    weights = tf.constant(np.full(INNER_STEPS, 1 / INNER_STEPS, np.float32))
    step = lambda: float(learner.train_step(batch, weights, second_order, True)["loss"])
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
    events = profile(FLAGS.way, FLAGS.shot, FLAGS.second_order, FLAGS.iterations)
    by_kind, by_phase, by_type = (collections.Counter() for _ in range(3))
    for op_name, op_type, seconds in events:
        seconds /= FLAGS.iterations
        by_kind[kind_of(op_type)] += seconds
        by_phase[phase_of(op_name)] += seconds
        by_type[op_type] += seconds
    order = "second" if FLAGS.second_order else "first"
    print(f"{FLAGS.way}-way {FLAGS.shot}-shot, {order} order: op time summed over all threads, "
          f"mean of {FLAGS.iterations} iterations")
    print_shares("kind", by_kind)
    print_shares("phase", by_phase)
    print_shares("op type", dict(by_type.most_common(FLAGS.top)))


if __name__ == "__main__":
    app.run(main)
