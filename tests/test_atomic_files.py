"""Specification of tf_mamlpp.atomic_files: a file is written whole or not at all."""

import os
import stat

import pytest

from tf_mamlpp.atomic_files import write_atomically


def test_the_file_holds_what_was_written_and_nothing_else_is_left(tmp_path):
    write_atomically(tmp_path / "a.bin", lambda file: file.write(b"first"))
    write_atomically(tmp_path / "a.bin", lambda file: file.write(b"second"))
    assert (tmp_path / "a.bin").read_bytes() == b"second"
    assert [path.name for path in tmp_path.iterdir()] == ["a.bin"]


@pytest.mark.parametrize("umask", [0o022, 0o007, 0o077])
def test_the_file_gets_the_mode_open_would_give(tmp_path, umask):
    """0o666 less the umask, not the temporary file's 0o600."""
    previous = os.umask(umask)
    try:
        write_atomically(tmp_path / "a.bin", lambda file: file.write(b"data"))
        with open(tmp_path / "b.bin", "wb"):
            pass
    finally:
        os.umask(previous)
    modes = [stat.S_IMODE((tmp_path / name).stat().st_mode) for name in ("a.bin", "b.bin")]
    assert modes == [0o666 & ~umask] * 2


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"old")

    def half_then_fail(file):
        file.write(b"new, half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(tmp_path / "a.bin", half_then_fail)
    assert (tmp_path / "a.bin").read_bytes() == b"old"
    assert [path.name for path in tmp_path.iterdir()] == ["a.bin"]


def test_a_failed_rename_leaves_no_temporary(tmp_path):
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_folder" / "inside").write_bytes(b"kept")
    with pytest.raises(OSError):  # a file cannot replace a non-empty folder
        write_atomically(tmp_path / "a_folder", lambda file: file.write(b"new"))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a_folder"]
    assert (tmp_path / "a_folder" / "inside").read_bytes() == b"kept"


def test_a_missing_folder_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_atomically(tmp_path / "missing" / "a.bin", lambda file: file.write(b"data"))
