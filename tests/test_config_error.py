"""Specification of tf_mamlpp.config_error: a setting named as the library's keyword or a flag."""

from tf_mamlpp.config_error import ConfigError


def test_the_library_names_the_keyword_and_a_front_end_its_flag():
    error = ConfigError("shot=3 plus query=2: more than the 4 images of class a", "shot", "query")
    assert isinstance(error, ValueError)
    assert str(error) == "shot=3 plus query=2: more than the 4 images of class a"
    assert error.spelled("--") == "--shot=3 plus --query=2: more than the 4 images of class a"


def test_only_the_named_fields_are_spelled_and_never_inside_a_word_or_path():
    error = ConfigError("way=7: more than the 6 classes of /data/way=1 (max_way=6, num_tasks=3)",
                        "way")
    assert error.spelled("--") == ("--way=7: more than the 6 classes of /data/way=1 "
                                   "(max_way=6, num_tasks=3)")
