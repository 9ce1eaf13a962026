"""ConfigError: a setting that cannot work, named so that each front end can spell it.

The library names a setting as the keyword it is passed by (`way=0: must be
at least 1`); main.py spells the same message with its flags (`--way=0: ...`).
Kept free of TensorFlow, so that settings are checked before it loads.
"""

import re


class ConfigError(ValueError):
    """A setting that cannot work.

    Args:
      message: one line, in which each of `fields` appears as `name=value`.
      *fields: the names of the settings at fault.
    """

    def __init__(self, message, *fields):
        super().__init__(message)
        self.fields = fields

    def spelled(self, prefix):
        """The message with each `name=` of `fields` written `{prefix}name=`, e.g. `--way=`."""
        message = str(self)
        for name in self.fields:
            # Not inside a word or a path: a class folder may be called "way=3".
            message = re.sub(rf"(?<![\w/\\.-]){re.escape(name)}=", f"{prefix}{name}=", message)
        return message
