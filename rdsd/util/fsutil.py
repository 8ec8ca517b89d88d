"""Crash-safe file primitives shared by the store, the config and security.

Every file that another part of rdsd may trust as complete is written to a
temporary name in the same directory, fsynced, renamed over the target and
the directory fsynced: after a crash at any point the target is either the
old complete file or the new complete one, never a torn mix.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(target: Path) -> Path:
    """A per-process temporary sibling of ``target`` (same filesystem)."""
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


def atomic_write(target: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``target`` with ``data`` so that readers see old or new, whole."""
    tmp = temp_name(target)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)


def commit_file(tmp: Path, target: Path) -> None:
    """Move an already written and fsynced ``tmp`` into place durably."""
    os.replace(tmp, target)
    fsync_dir(target.parent)


@contextlib.contextmanager
def removing_on_error(path: Path) -> Iterator[Path]:
    """Yield ``path``; delete it if the block fails, so no partial file stays."""
    try:
        yield path
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise


def try_lock(fd: int, *, shared: bool = False, wait: bool = False) -> bool:
    """Take an advisory lock on ``fd``: True if taken, False if another
    process holds it (only when ``wait`` is false). The kernel drops the lock
    when the process dies, which is why locks, not pid files, decide who
    owns a job, a download or a home."""
    op = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        fcntl.flock(fd, op | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def file_lock(path: Path, *, wait: bool = False) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block;
    yields whether this process got it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        yield try_lock(fd, wait=wait)
    finally:
        os.close(fd)


class FileId(NamedTuple):
    """What changes when a file is written to or replaced: compared with the
    value recorded when a package was last verified."""

    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path_or_fd: Path | int) -> FileId:
        st = os.stat(path_or_fd)
        return cls(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
