"""Crash-safe file primitives shared by the store, the config and security.

Every file that another part of rdsd may trust as complete is written to a
temporary name in the same directory, fsynced, renamed over the target and
the directory fsynced: after a crash at any point the target is either the
old complete file or the new complete one, never a torn mix.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


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
