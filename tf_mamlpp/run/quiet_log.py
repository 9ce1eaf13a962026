"""Only the project's lines during a run: the libraries' informational log lines left out.

TensorFlow and Keras write their notes through absl logging, the logger
main.py writes its own lines with, at the same INFO level: each checkpoint's
"Sharding callback duration", the export's "Writing fingerprint" and one
"contains input name(s) ... which will be renamed" per traced signature. They
say nothing a user can act on, and a short run printed 19 of them among its
own lines. So at the default verbosity a filter on absl's handler passes a
record below WARNING only if it was logged from the project's own files;
warnings and errors pass from anyone, and `--verbosity=1` passes everything.
"""

import logging
import os

from absl import logging as absl_logging

_REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Where the project's own log lines come from: the package, the command line,
# the benchmarks and the tools.
PROJECT_FILES = tuple(os.path.join(_REPOSITORY, name)
                      for name in ("tf_mamlpp" + os.sep, "main.py", "benchmarks" + os.sep,
                                   "tools" + os.sep))


class ProjectLinesOnly(logging.Filter):
    """Passes warnings and errors, and other records only from the project's own files."""

    def filter(self, record):
        return record.levelno >= logging.WARNING or record.pathname.startswith(PROJECT_FILES)


def hide_library_notes(verbosity):
    """Leaves the libraries' INFO and DEBUG lines out of absl's output below `verbosity` 1.

    Args:
      verbosity: absl's --verbosity; 1 and above show every line.
    """
    handler = absl_logging.get_absl_handler()
    for existing in [f for f in handler.filters if isinstance(f, ProjectLinesOnly)]:
        handler.removeFilter(existing)
    if verbosity < 1:
        handler.addFilter(ProjectLinesOnly())
