"""Floating-point operations of a traced step, and the rate a large matmul reaches.

The achieved FLOP rate of the meta-step says how close it gets to what the
machine can do; the matmul rate, measured in the same process, is that
ceiling. Only convolutions and matrix products are counted (their FLOPs
follow from the shapes): they are the arithmetic the step exists for, while
element-wise ops, batch norm and pooling are memory traffic, not FLOPs that
a faster kernel could add.
"""

import time

import numpy as np
import tensorflow as tf


def op_flops(op):
    """Multiply-adds (x2) of one convolution or matrix-product op; 0 for any other op.

    A convolution and its two gradients each cost 2 * (elements of the conv
    output) * (kernel height * width * input channels).
    """
    conv_operands = {  # op type: (its kernel's shape, the conv output's shape)
        "Conv2D": lambda: (op.inputs[1].shape, op.outputs[0].shape),
        "Conv2DBackpropInput": lambda: (op.inputs[1].shape, op.inputs[2].shape),
        "Conv2DBackpropFilter": lambda: (op.outputs[0].shape, op.inputs[2].shape),
    }
    if op.type in conv_operands:
        kernel, output = conv_operands[op.type]()
        return 2 * _elements(output, op) * _elements(kernel[:3], op)
    if op.type in ("MatMul", "BatchMatMulV2"):
        left = op.inputs[0].shape
        transposed = op.get_attr("transpose_a" if op.type == "MatMul" else "adj_x")
        return 2 * _elements(op.outputs[0].shape, op) * _elements(left[-2:-1] if transposed
                                                                 else left[-1:], op)
    return 0


def _elements(shape, op):
    elements = shape.num_elements()
    if elements is None:
        raise ValueError(f"{op.type} {op.name}: shape {shape} is unknown at trace time")
    return elements


def graph_flops(graph):
    """FLOPs of every convolution and matrix product in `graph` (a FuncGraph).

    Ops inside nested function bodies (tf.map_fn, tf.while_loop) are not
    visited: count a graph that calls the loop body once and scale it.
    """
    return sum(op_flops(op) for op in graph.get_operations())


def matmul_flop_rate(size=4096, repeats=7, warm_up=3):
    """FLOP/s of a size x size float32 matrix product with all cores: the machine's ceiling.

    The median of `repeats` products after `warm_up` ones: the first few run
    slower while the thread pool and the CPU's clock come up.
    """
    left = tf.random.normal((size, size))
    right = tf.random.normal((size, size))
    product = tf.function(tf.matmul)
    for _ in range(warm_up):
        product(left, right).numpy()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        product(left, right).numpy()
        times.append(time.perf_counter() - started)
    return 2 * size**3 / float(np.median(times))
