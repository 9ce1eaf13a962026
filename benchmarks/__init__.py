"""Benchmarks of the meta-step, the data pipeline and start-up, run from the repository root
as modules: `python -m benchmarks.meta_iteration` (see benchmarks/README.md)."""

from tf_mamlpp.hardware.onednn import prefer_onednn

# Before any benchmark loads TensorFlow, so that it times the kernels main.py runs.
prefer_onednn()
