"""Writing files whole or not at all: the one atomic-write helper every module uses.

A file is written to a hidden temporary name in its own folder and renamed over the final name
only once it is complete, so an interrupted command (Ctrl-C, kill -9, a full disk) leaves the
earlier file or none, never a truncated one. The temporary file is created with the mode a plain
``open`` would give (``0o666`` less the umask), not the ``0o600`` of :mod:`tempfile`.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import threading
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["atomic_path", "atomic_write_text", "atomic_write_bytes", "atomic_save", "atomic_link",
           "check_writable_file", "umask_mode"]

_counter = itertools.count()
_lock = threading.Lock()


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` less this process's umask: what ``open(path, "w")`` gives a new file."""
    with _lock:  # os.umask both reads and sets it: no other thread may see it changed
        mask = os.umask(0)
        os.umask(mask)
    return mode & ~mask


def _temporary_name(path: Path) -> Path:
    with _lock:
        n = next(_counter)
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{n}.part")


@contextlib.contextmanager
def atomic_path(path: str | Path, *, suffix_keep: bool = False) -> Iterator[Path]:
    """A temporary path to write ``path``'s content to; renamed to ``path`` when the block ends
    without an error, deleted when it raises.

    ``suffix_keep``: the temporary name ends with ``path``'s own suffix (for writers that choose
    the format by the file ending, such as Pillow or ONNX).
    """
    path = Path(path)
    tmp = _temporary_name(path)
    if suffix_keep and path.suffix:
        tmp = tmp.with_name(tmp.name + path.suffix)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, umask_mode())  # writers that use mkstemp create 0600 files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as fh:
            fh.write(data)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save(path: str | Path, write: Callable[[Path], object], suffix_keep: bool = True) -> Path:
    """``write(tmp)`` to a temporary path, then rename it to ``path`` (see :func:`atomic_path`)."""
    path = Path(path)
    with atomic_path(path, suffix_keep=suffix_keep) as tmp:
        write(tmp)
    return path


def atomic_link(source: str | Path, path: str | Path) -> bool:
    """Make ``path`` the same file as ``source`` (a hard link, renamed into place as
    :func:`atomic_path` does): no second copy written. ``source`` must be replaced, never changed
    in place, from then on (lmnet's writers all replace). False, and nothing changed, where the
    file system has no hard links (the caller writes the file instead)."""
    try:
        with atomic_path(path) as tmp:
            os.link(source, tmp)
    except OSError:
        return False
    return True


def check_writable_file(path: str | Path, what: str = "output") -> Path:
    """Raise ``ValueError`` (one line) if ``path`` cannot become a file: it is a folder, its parent
    is a file, or its parent folder (or the nearest existing ancestor) is not writable.
    Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"the {what} {path} is a folder; give a file name")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ValueError(f"cannot write the {what} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write the {what} {path}: no permission to write in {parent}")
    try:  # root passes os.access everywhere: a read-only file system shows only when writing
        import tempfile

        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise ValueError(f"cannot write the {what} {path}: {parent}: "
                         f"{err.strerror or err}") from None
    return path


def cache_dir() -> Path:
    """lmnet's cache folder (measured engine choices, converted OpenVINO models):
    ``$LMNET_CACHE_DIR``, else ``$XDG_CACHE_HOME/lmnet``, else ``~/.cache/lmnet``. Safe to delete."""
    import os

    root = os.environ.get("LMNET_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmnet"
