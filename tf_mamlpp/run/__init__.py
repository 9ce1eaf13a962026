"""The command line: settings and their checks, the training loop, the run directory."""
