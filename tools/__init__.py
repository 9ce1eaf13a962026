"""Tools run from the repository root as modules: `python -m tools.crash_soak` (README, Runs)."""
