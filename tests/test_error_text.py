"""Specification of tf_mamlpp.error_text: one readable line from any exception."""

import pytest
import tensorflow as tf

from tf_mamlpp.error_text import tensorflow_error_text

UNKNOWN_FORMAT = "Unknown image file format"


def raised(function):
    try:
        function()
    except Exception as error:  # the test wants whatever it raises
        return error
    pytest.fail("expected an error")


@pytest.mark.parametrize("where", ["eager", "tf.function", "tf.data"])
def test_tensorflow_errors_lose_their_node_and_op_tags(where):
    garbage = tf.constant(b"not an image")
    decode = {
        "eager": lambda: tf.io.decode_image(garbage),
        "tf.function": lambda: tf.function(tf.io.decode_image)(garbage),
        "tf.data": lambda: next(iter(
            tf.data.Dataset.from_tensor_slices([garbage]).map(tf.io.decode_image))),
    }[where]
    error = raised(decode)
    assert "{{" in error.message and "[Op:" in error.message  # what there is to remove
    text = tensorflow_error_text(error)
    assert UNKNOWN_FORMAT in text
    assert "\n" not in text and "{{" not in text and "[Op:" not in text
    assert text == text.strip()


def test_other_errors_give_their_first_line_or_their_type():
    assert tensorflow_error_text(ValueError("first line\nsecond line")) == "first line"
    assert tensorflow_error_text(ValueError()) == "ValueError"
    assert tensorflow_error_text(AssertionError("  \n")) == "AssertionError"
