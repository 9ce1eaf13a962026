"""One line of an exception's message, for errors that name a file or flag and say why.

TensorFlow's messages run to many lines and carry tags for the graph node
and op that raised them, e.g. `{{function_node __inference_...}}` or
`[Op:DecodeImage]`, which mean nothing to a user who passed a bad file; an
error in a tf.function may open with where its node was defined, the reason
after that.
"""

import re

# A graph node's name in double braces, or the op's name in brackets.
_TENSORFLOW_TAGS = re.compile(r"\{\{.*?\}\}\s*|\s*\[Op:[^\]]*\]")
_GRAPH_EXECUTION_ERROR = "Graph execution error:"


def tensorflow_error_text(error):
    """The first line of `error`'s reason, TensorFlow's node and op tags removed.

    Works for any exception: TensorFlow's keep their text in `message`, others
    in `str(error)`; one with no text gives its type's name.
    """
    message = getattr(error, "message", None) or str(error)
    lines = [line for line in _TENSORFLOW_TAGS.sub("", message).splitlines() if line.strip()]
    if lines and lines[0].startswith(_GRAPH_EXECUTION_ERROR):
        # "Detected at node N defined at (most recent call last):", an indented
        # traceback, then the reason.
        lines = [line for line in lines[1:] if not line.startswith(("Detected at node", " "))]
    return lines[0].strip() if lines else type(error).__name__
