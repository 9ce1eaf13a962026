"""Benchmarks of the meta-step, the data pipeline and start-up, run from the repository root
as modules: `python -m benchmarks.meta_iteration` (see benchmarks/README.md)."""

# Before any benchmark loads TensorFlow, so that it times the kernels main.py runs
# (the package turns oneDNN's on; see tf_mamlpp/__init__.py).
import tf_mamlpp  # noqa: F401
