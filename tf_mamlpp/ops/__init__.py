"""Closed-form derivative kernels that make the second-order meta-gradient fast.

Each kernel (batch_norm_kernel.py, max_pool_kernel.py) also has a plain
path: the same function built from TensorFlow's own ops and differentiated
by TensorFlow's registered gradients, exact to any order, in float64 too.
`plain_tensorflow()` is the one switch between the two. The plain path is
the reference: the finite-difference checks of the meta-gradient run on it
in float64, and tests/test_inner_loop.py shows the fast path gives the same
meta-gradients.
"""

import contextlib
import contextvars

_PLAIN_TENSORFLOW = contextvars.ContextVar("plain_tensorflow", default=False)


@contextlib.contextmanager
def plain_tensorflow():
    """Kernels built inside differentiate through TensorFlow's own ops.

    For graphs that must hold no custom gradient: a SavedModel keeps a custom
    gradient but not the one nested in it (the closed-form second derivatives
    are nested in the first), so a model exported with them warns on every
    load, once per function, that a gradient may fail; serving adapts to
    first order only and needs neither (see serving/saved_model.py). And for the
    reference the fast path is checked against. It acts when a function is
    traced, not when it runs.
    """
    token = _PLAIN_TENSORFLOW.set(True)
    try:
        yield
    finally:
        _PLAIN_TENSORFLOW.reset(token)


def uses_plain_tensorflow():
    """Whether a kernel built now takes the plain path (see `plain_tensorflow`)."""
    return _PLAIN_TENSORFLOW.get()
