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
import stat
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


def atomic_write(target: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``target`` with ``data`` so that readers see old or new, whole
    (private to the owner unless ``mode`` says otherwise)."""
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


def loose_modes(root: Path, depth: int = 2, limit: int = 10_000) -> list[tuple[Path, int]]:
    """Files and directories under ``root`` (itself included, ``depth``
    levels down, at most ``limit`` looked at) that group or others may
    read, write or enter, with their permission bits. Symbolic links are
    not followed. A home holds keys, the job database and packages: only
    its owner has any business there."""
    found: list[tuple[Path, int]] = []
    seen = 0
    level = [root]
    for _ in range(depth + 1):
        following: list[Path] = []
        for path in level:
            seen += 1
            if seen > limit:
                return found
            try:
                st = path.lstat()
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                continue
            if st.st_mode & 0o077:
                found.append((path, stat.S_IMODE(st.st_mode)))
            if stat.S_ISDIR(st.st_mode):
                with contextlib.suppress(OSError):
                    following.extend(sorted(path.iterdir()))
        level = following
    return found


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
