"""Benchmarks of the meta-step, the data pipeline and start-up, run from the repository root
as modules: `python -m benchmarks.meta_iteration` (see benchmarks/README.md)."""
