"""One package being received into a store's ``partial/`` directory.

Every chunk is checked against the signed manifest before it is written as
good, in a writer thread of its own that keeps several chunks in flight
while the next ones arrive. Only the verified prefix is ever trusted: on
resume the partial file is re-read chunk by chunk and cut back at the first
chunk that does not match, so a torn or garbled tail left by a crash is
fetched again. Readers (a relay serving its children) can follow the
download chunk by chunk, which is how a relay serves while it fetches: each
verified chunk also goes into the store's shared chunk cache, so waiting
children get it from memory (cut-through).

Each byte is hashed once: the signed chunk digests cover every byte, so once
every chunk matched as it was written (and the file was fsynced) the package
is complete and verified; there is no second whole-file pass, and the store
records it as verified so the install does not hash it again in this run.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from ..errors import CorruptChunk, DiskFull, ExpiredPackage, StoreError
from ..util.fsutil import FileId, atomic_write, commit_file, try_lock
from .manifest import Manifest

if TYPE_CHECKING:
    from .store import Store

T = TypeVar("T")
IN_FLIGHT = 4  # chunks being checked and written while the next ones arrive
log = structlog.get_logger("rdsd.store")


def _quiet(fut: asyncio.Future[None]) -> None:
    """Collect the outcome of a write nobody waits for any more."""
    if not fut.cancelled():
        fut.exception()


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking disk work in the default executor."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _store_error(path: Path, exc: OSError) -> StoreError:
    """An OSError while storing, as an error that names the file."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return DiskFull(f"disk full: cannot store {path}: {reason}")
    return StoreError(f"cannot store {path}: {reason}")


class Download:
    """One package being received into ``partial/``, chunk by verified chunk."""

    def __init__(self, store: Store, manifest: Manifest, envelope: bytes) -> None:
        self.store = store
        self.manifest = manifest
        self.envelope = envelope
        self.path = store.partial_dir / f"{manifest.id}.part"
        self.verified = 0
        self.done = False
        self.error: str | None = None
        self._fd = -1
        self._changed = asyncio.Event()
        # For readers in other threads (extraction overlapping the download).
        self.progress = threading.Condition()
        # One writer thread per file keeps writes in order while several
        # chunks are in flight.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix=f"rdsd-write-{manifest.id}")
        self._inflight: deque[tuple[asyncio.Future[None], bytes | memoryview]] = deque()
        self._submitted = 0
        self._broken = False

    # -- life cycle ----------------------------------------------------------

    async def open(self, resume: bool) -> None:
        """Open (and lock) the partial file; keep its verified prefix if
        ``resume``, else start from byte zero."""
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not try_lock(self._fd):
            os.close(self._fd)
            self._fd = -1
            raise StoreError(f"{self.manifest.id} is being downloaded by another process")
        env_path = self.store.partial_dir / f"{self.manifest.id}.env"
        if resume and env_path.exists() and env_path.read_bytes() == self.envelope:
            self.verified = await in_thread(self._rescan)
        else:
            os.ftruncate(self._fd, 0)
            atomic_write(env_path, self.envelope)
        self._submitted = self.verified
        try:
            await in_thread(self._preallocate)
        except DiskFull as exc:
            self.fail(str(exc), keep_partial=False)
            raise

    def _preallocate(self) -> None:
        """Reserve the rest of the file up front: writes into reserved space
        are several times faster than growing the file, and a disk that
        cannot hold the package says so now, before anything is written."""
        rest = self.manifest.size - self.verified
        if rest <= 0:
            return
        try:
            os.posix_fallocate(self._fd, self.verified, rest)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise DiskFull(
                    f"{self.manifest.id}: no room for {rest} more bytes: {exc.strerror}"
                ) from exc
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise

    def _rescan(self) -> int:
        """Length of the prefix whose chunks all match; cut the file there."""
        m = self.manifest
        good = 0
        for index, digest in enumerate(m.chunks):
            length = m.chunk_length(index)
            data = os.pread(self._fd, length, good)
            if len(data) != length or hashlib.sha256(data).digest() != digest:
                break
            good += length
        os.ftruncate(self._fd, good)
        return good

    async def write_chunk(self, offset: int, data: bytes | memoryview) -> None:
        """Queue ``data`` to be checked against the manifest and written; a
        mismatch raises CorruptChunk (here or from a later call) and nothing
        of it is written. Up to IN_FLIGHT chunks are checked and written
        while the next ones arrive; ``verified`` counts only finished ones."""
        fut = asyncio.wrap_future(self.lane_write(offset, data))
        self._inflight.append((fut, data))
        while self._inflight and (len(self._inflight) > IN_FLIGHT or self._inflight[0][0].done()):
            await self._settle_one()

    def lane_write(self, offset: int, data: bytes | memoryview) -> Future[None]:
        """Queue ``data`` to be checked and written by the writer thread,
        without the event loop: what ``write_chunk`` does on the loop, and
        what a lane's receiving thread (``net/lane.py``) calls itself; it
        waits for the future and then hands the chunk to ``settled`` on the
        loop. Only one of the two ways feeds a download during one attempt."""
        m = self.manifest
        if self.done or self.error is not None:
            raise StoreError(f"{m.id}: download already closed")
        if offset != self._submitted or offset % m.chunk_size:
            raise StoreError(f"{m.id}: chunk at {offset}, expected {self._submitted}")
        index = offset // m.chunk_size
        if index >= len(m.chunks) or len(data) != m.chunk_length(index):
            raise CorruptChunk(m.id, offset, "wrong length")
        self._submitted += len(data)
        return self._writer.submit(self._write, index, offset, data)

    def settled(self, data: bytes | memoryview) -> bool:
        """On the loop: a chunk a lane wrote matched and is on disk. True
        when ``data`` is kept (children following the download read it from
        the chunk cache), so its buffer may not be used again."""
        if self.done or self.error is not None:
            return False
        return self._advance(data)

    def lane_ended(self) -> None:
        """On the loop, once a lane's thread is done: what it submitted and
        did not settle is not there."""
        self._submitted = self.verified

    async def flush(self) -> None:
        """Wait for every queued chunk to be written (or to fail)."""
        while self._inflight:
            await self._settle_one()

    async def _settle_one(self) -> None:
        fut, data = self._inflight.popleft()
        try:
            await fut
        except BaseException:
            # Later chunks were refused in the thread; collect them quietly.
            for rest, _ in self._inflight:
                with contextlib.suppress(BaseException):
                    await rest
            self._inflight.clear()
            self._submitted = self.verified
            raise
        self._advance(data)

    def _advance(self, data: bytes | memoryview) -> bool:
        # Verified and written: readers following the download (children of
        # a relay) take it from memory rather than from the file.
        kept = self.store.followed(self.manifest.id)
        if kept:
            index = self.verified // self.manifest.chunk_size
            self.store.cache.put_data(self.manifest.id, index, data)
        self.verified += len(data)
        self._notify()
        return kept

    def _write(self, index: int, offset: int, data: bytes | memoryview) -> None:
        if self._broken:
            raise StoreError(f"{self.manifest.id}: an earlier chunk failed")
        if hashlib.sha256(data).digest() != self.manifest.chunks[index]:
            self._broken = True
            raise CorruptChunk(self.manifest.id, offset, "received")
        view = memoryview(data)
        pos = offset
        try:
            while view:
                n = os.pwrite(self._fd, view, pos)
                view = view[n:]
                pos += n
        except OSError as exc:
            self._broken = True
            os.ftruncate(self._fd, offset)
            if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise DiskFull(f"{self.manifest.id}: disk full writing at {offset}: {exc}") from exc
            raise StoreError(f"{self.manifest.id}: write failed at {offset}: {exc}") from exc

    async def finish(self) -> None:
        """Make the file durable and move it into the store. Every chunk has
        matched its signed digest, which together cover every byte, so the
        package is recorded as verified without hashing it again. Afterwards
        the package is complete for every reader."""
        m = self.manifest
        await self.flush()
        if self.verified != m.size:
            raise StoreError(f"{m.id}: {self.verified} of {m.size} bytes received")
        if self.store.expired(m):
            self.fail("expired", keep_partial=False)
            raise ExpiredPackage(f"{m.id} expired while it was received: not stored")
        await in_thread(os.fsync, self._fd)
        store = self.store
        data, env = store.data_path(m.id), store.envelope_path(m.id)
        with store.committing():
            commit_file(self.path, data)
            try:
                atomic_write(env, self.envelope)
            except OSError as exc:
                # Back to partial/ (the bytes are good): never an archive
                # without its envelope in the store.
                os.replace(data, self.path)
                raise _store_error(env, exc) from exc
        with contextlib.suppress(FileNotFoundError):
            (store.partial_dir / f"{m.id}.env").unlink()
        store.mark_verified(m.id, FileId.of(self._fd))
        self._close()
        self.done = True
        store.forget(self)
        self._notify()
        store.notify()
        log.info("package.stored", store=str(store.root), package=m.id, size=m.size)

    def fail(self, reason: str, keep_partial: bool) -> None:
        """Stop this download. With ``keep_partial`` the verified prefix stays
        for a later resume; without it every trace is removed."""
        if self.done or self.error is not None:
            return
        self.error = reason
        self._close()
        if not keep_partial:
            for p in (self.path, self.store.partial_dir / f"{self.manifest.id}.env"):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        self.store.forget(self)
        self._notify()

    def _close(self) -> None:
        # No write may still be running when the descriptor goes away.
        self._writer.shutdown(wait=True, cancel_futures=True)
        for fut, _ in self._inflight:
            fut.add_done_callback(_quiet)
        self._inflight.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        with self.progress:
            self.progress.notify_all()

    def wait_verified(self, beyond: int, timeout: float) -> bool:
        """From another thread: wait up to ``timeout`` until more than
        ``beyond`` bytes are verified or the download ended; False if not."""
        with self.progress:
            return self.progress.wait_for(
                lambda: self.verified > beyond or self.done or self.error is not None, timeout
            )

    async def wait_beyond(self, offset: int, timeout: float) -> None:
        """Wait until more than ``offset`` bytes are verified, or it ended."""
        while self.verified <= offset and not self.done and self.error is None:
            event = self._changed
            async with asyncio.timeout(timeout):
                await event.wait()
