"""A run of the command line: configuration, training loop, run directory, evaluation, export."""
