"""Files written whole or not at all: a temporary file beside the target, then a rename.

A process killed mid-write leaves the old file or the new one, never a
truncated one, so a run resumes from its files and a second process reading a
cache needs no lock. The run directory's JSON files and both image caches are
written this way.
"""

import contextlib
import os
import pathlib
import tempfile

# The temporary file of `path`: ".<name>.<random>.tmp" beside it.
_SUFFIX = ".tmp"


def write_atomically(path, write):
    """Writes `path` through `write(file)`, which fills a binary file object.

    The temporary file lies in `path`'s folder (a rename is atomic only within
    one file system), is flushed to disk before the rename, and gets the mode
    `open(path, "w")` would give: 0o666 less the umask, not the temporary
    file's 0o600, so that results and shared caches are as readable as any
    other file. On any failure the temporary file is removed and `path` is
    left as it was.

    Args:
      path: the file to write; its folder must exist.
      write: called once with the open temporary file, e.g.
        `lambda file: np.save(file, array)`.

    Raises:
      OSError: the folder cannot be written (no space, read-only), and
      whatever `write` raises.
    """
    path = pathlib.Path(path)
    file = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=_SUFFIX,
                                       delete=False)
    try:
        with file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
            os.fchmod(file.fileno(), 0o666 & ~_umask())
        os.replace(file.name, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the first error is the one to report
            os.unlink(file.name)
        raise


def leftover_temporary_files(folder):
    """The temporary files in `folder` of writes that never finished: a process was killed.

    Only whoever owns the folder may remove them (a run directory's lock): in
    a shared one, such a file may be a live process's write in progress.
    """
    return [path for path in pathlib.Path(folder).glob(f".*{_SUFFIX}") if path.is_file()]


def _umask():
    """The process's umask, from /proc where Linux shows it: os.umask reads it only by
    setting it, and a file another thread creates meanwhile gets the value set (here
    0o077, so such a file is never more open than asked)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o077)
    os.umask(umask)
    return umask
