"""The package store: the server's storehouse, a relay's cache, a client's
downloads. One format everywhere.

A complete package is two files, ``ID.pkg`` (the archive) and ``ID.env``
(the signed manifest envelope). The envelope is written last and deleted
first, so a package whose envelope exists is complete and verified; anything
else found at start-up is debris from a crash and is removed.

Downloads live in ``partial/`` until every chunk has been checked against the
signed digests. Only the verified prefix is ever trusted: on resume the
partial file is re-read chunk by chunk and cut back at the first chunk that
does not match, so a torn or garbled tail left by a crash is fetched again.
While a download runs, readers (a relay serving its children) can follow it
chunk by chunk, which is how a relay serves while it fetches.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import structlog

from protocol import is_package_id

from .fsutil import atomic_write, commit_file, fsync_dir
from .manifest import Manifest, ManifestError, open_envelope
from .security import Verifier

T = TypeVar("T")
IN_FLIGHT = 4  # chunks being checked and written while the next ones arrive
READ_AHEAD = 2  # chunks read and checked ahead of the one being sent
DEBRIS_AGE = 600.0  # seconds an archive may sit without its envelope before it is debris
log = structlog.get_logger("rdsd.store")


class StoreError(Exception):
    """A store operation failed; the message is meant for an operator."""


class CorruptChunk(StoreError):
    """A chunk on disk or on the wire does not match its signed digest."""

    def __init__(self, package: str, offset: int, where: str) -> None:
        super().__init__(f"{package}: chunk at offset {offset} does not match its digest ({where})")
        self.package = package
        self.offset = offset


class DiskFull(StoreError):
    """ENOSPC/EFBIG while writing: the download is dropped, the store intact."""


def _pid_alive(text: str) -> bool:
    """Is the process whose id ends a temporary file's name still running?"""
    if not text.isdigit():
        return False
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _quiet(fut: asyncio.Future[None]) -> None:
    """Collect the outcome of a write nobody waits for any more."""
    if not fut.cancelled():
        fut.exception()


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


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
        self._hash = hashlib.sha256()
        self._fd = -1
        self._changed = asyncio.Event()
        # One writer thread per file keeps writes (and the running whole-file
        # hash) in order while several chunks are in flight.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix=f"rdsd-write-{manifest.id}")
        self._inflight: deque[tuple[asyncio.Future[None], int]] = deque()
        self._submitted = 0
        self._broken = False

    # -- life cycle ----------------------------------------------------------

    async def open(self, resume: bool) -> None:
        """Open (and lock) the partial file; keep its verified prefix if
        ``resume``, else start from byte zero."""
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = -1
            raise StoreError(f"{self.manifest.id} is being downloaded by another process") from None
        env_path = self.store.partial_dir / f"{self.manifest.id}.env"
        if resume and env_path.exists() and env_path.read_bytes() == self.envelope:
            self.verified = await _in_thread(self._rescan)
        else:
            os.ftruncate(self._fd, 0)
            atomic_write(env_path, self.envelope)
        self._submitted = self.verified
        try:
            await _in_thread(self._preallocate)
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
            self._hash.update(data)
            good += length
        os.ftruncate(self._fd, good)
        return good

    async def write_chunk(self, offset: int, data: bytes | memoryview) -> None:
        """Queue ``data`` to be checked against the manifest and written; a
        mismatch raises CorruptChunk (here or from a later call) and nothing
        of it is written. Up to IN_FLIGHT chunks are checked and written
        while the next ones arrive; ``verified`` counts only finished ones."""
        m = self.manifest
        if self.done or self.error is not None:
            raise StoreError(f"{m.id}: download already closed")
        if offset != self._submitted or offset % m.chunk_size:
            raise StoreError(f"{m.id}: chunk at {offset}, expected {self._submitted}")
        index = offset // m.chunk_size
        if index >= len(m.chunks) or len(data) != m.chunk_length(index):
            raise CorruptChunk(m.id, offset, "wrong length")
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._writer, self._write, index, offset, data)
        self._inflight.append((fut, len(data)))
        self._submitted += len(data)
        while self._inflight and (len(self._inflight) > IN_FLIGHT or self._inflight[0][0].done()):
            await self._settle_one()

    async def flush(self) -> None:
        """Wait for every queued chunk to be written (or to fail)."""
        while self._inflight:
            await self._settle_one()

    async def _settle_one(self) -> None:
        fut, length = self._inflight.popleft()
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
        self.verified += length
        self._notify()

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
        self._hash.update(data)

    async def finish(self) -> None:
        """Check the whole-file digest, make it durable and move it into the
        store. Afterwards the package is complete for every reader."""
        m = self.manifest
        await self.flush()
        if self.verified != m.size:
            raise StoreError(f"{m.id}: {self.verified} of {m.size} bytes received")
        if self._hash.digest() != m.sha256:
            self.fail("whole-file digest mismatch", keep_partial=False)
            raise CorruptChunk(m.id, 0, "whole file")
        await _in_thread(os.fsync, self._fd)
        store = self.store
        commit_file(self.path, store.data_path(m.id))
        atomic_write(store.envelope_path(m.id), self.envelope)
        with contextlib.suppress(FileNotFoundError):
            (store.partial_dir / f"{m.id}.env").unlink()
        self._close()
        self.done = True
        store.forget(self)
        self._notify()
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

    async def wait_beyond(self, offset: int, timeout: float) -> None:
        """Wait until more than ``offset`` bytes are verified, or it ended."""
        while self.verified <= offset and not self.done and self.error is None:
            event = self._changed
            async with asyncio.timeout(timeout):
                await event.wait()


class Store:
    """Complete packages plus the downloads in progress, in one directory."""

    def __init__(self, root: Path, verifier: Verifier, refetchable: bool = True) -> None:
        self.root = root
        # A relay or client can fetch a damaged package again from its parent;
        # the server's storehouse cannot, so it leaves a bad package in place.
        self.refetchable = refetchable
        self.partial_dir = root / "partial"
        self.verifier = verifier
        self._downloads: dict[str, Download] = {}
        self._manifests: dict[str, tuple[bytes, Manifest]] = {}
        self._readers: dict[str, int] = {}

    def verify(self, package: str) -> None:
        """Re-check a complete package against its manifest (before it is
        installed): raises CorruptChunk at the first bad chunk."""
        m = self.manifest(package)
        if m is None:
            raise StoreError(f"{package} is not in the store")
        # The signed chunk digests cover every byte, so one pass suffices.
        with self.data_path(package).open("rb") as f:
            for index in range(len(m.chunks)):
                data = f.read(m.chunk_length(index))
                if hashlib.sha256(data).digest() != m.chunks[index]:
                    raise CorruptChunk(package, index * m.chunk_size, "at rest")
            if f.read(1):
                raise CorruptChunk(package, m.size, "trailing bytes at rest")

    def prepare(self) -> None:
        """Create the layout and remove debris a crash may have left. Other
        processes (the daemon, an admin command, rdsft) may be writing this
        store right now, so only files that cannot be theirs go: temporary
        files of dead processes, and archives left without an envelope for
        longer than any commit takes."""
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        for path in self.root.iterdir():
            if path.name.startswith(".") and ".tmp-" in path.name:
                if not _pid_alive(path.name.rsplit("-", 1)[-1]):
                    path.unlink(missing_ok=True)
            elif path.suffix == ".pkg" and not path.with_suffix(".env").exists():
                with contextlib.suppress(FileNotFoundError):
                    if now - path.stat().st_mtime > DEBRIS_AGE:
                        log.warning("store.debris_removed", file=str(path))
                        path.unlink()
        fsync_dir(self.root)

    # -- paths and lookups ---------------------------------------------------

    def data_path(self, package: str) -> Path:
        self._check_id(package)
        return self.root / f"{package}.pkg"

    def envelope_path(self, package: str) -> Path:
        self._check_id(package)
        return self.root / f"{package}.env"

    @staticmethod
    def _check_id(package: str) -> None:
        if not is_package_id(package):
            raise StoreError(f"unsafe package id {package!r}")

    def ids(self) -> list[str]:
        return sorted(
            p.name[: -len(".env")]
            for p in self.root.glob("*.env")
            if is_package_id(p.name[: -len(".env")])
        )

    def has(self, package: str) -> bool:
        return self.envelope_path(package).exists() and self.data_path(package).exists()

    def envelope(self, package: str) -> bytes | None:
        try:
            return self.envelope_path(package).read_bytes()
        except FileNotFoundError:
            return None

    def manifest(self, package: str) -> Manifest | None:
        """The verified manifest of a complete package (cached by envelope)."""
        env = self.envelope(package)
        if env is None:
            return None
        cached = self._manifests.get(package)
        if cached is not None and cached[0] == env:
            return cached[1]
        try:
            m = open_envelope(env, self.verifier)
        except ManifestError as exc:
            raise StoreError(f"{package}: stored manifest rejected: {exc}") from None
        self._manifests[package] = (env, m)
        return m

    def manifests(self) -> list[Manifest]:
        out = []
        for package in self.ids():
            m = self.manifest(package)
            if m is not None:
                out.append(m)
        return out

    def in_use(self, package: str) -> bool:
        return self._readers.get(package, 0) > 0 or package in self._downloads

    # -- writing -------------------------------------------------------------

    def replace_envelope(self, package: str, envelope: bytes) -> None:
        """Swap in a re-signed manifest (new keep duration) for the same bytes."""
        atomic_write(self.envelope_path(package), envelope)

    def delete(self, package: str) -> None:
        """Envelope first: from that moment the package no longer counts."""
        for path in (self.envelope_path(package), self.data_path(package)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._manifests.pop(package, None)
        fsync_dir(self.root)

    def quarantine(self, package: str, offset: int) -> None:
        """A complete package turned out to hold a bad chunk at ``offset``:
        take it out of service and keep its good prefix as a partial
        download, so a node with a parent fetches only the rest again."""
        env = self.envelope(package)
        if not self.refetchable or env is None or package in self._downloads:
            return
        part = self.partial_dir / f"{package}.part"
        self.envelope_path(package).unlink()
        self._manifests.pop(package, None)
        os.replace(self.data_path(package), part)
        os.truncate(part, offset)
        atomic_write(self.partial_dir / f"{package}.env", env)
        fsync_dir(self.root)
        log.error("store.quarantined", store=str(self.root), package=package, offset=offset)

    def active(self, package: str) -> Download | None:
        return self._downloads.get(package)

    async def begin_download(self, envelope: bytes, manifest: Manifest, resume: bool) -> Download:
        """Start receiving ``manifest``'s package, or join the one in progress
        so a package is fetched once however many want it."""
        current = self._downloads.get(manifest.id)
        if current is not None:
            return current
        dl = Download(self, manifest, envelope)
        self._downloads[manifest.id] = dl
        try:
            await dl.open(resume)
        except BaseException:
            self._downloads.pop(manifest.id, None)
            raise
        return dl

    def forget(self, dl: Download) -> None:
        if self._downloads.get(dl.manifest.id) is dl:
            del self._downloads[dl.manifest.id]

    # -- reading -------------------------------------------------------------

    async def chunks(
        self, package: str, offset: int, wait_timeout: float = 60.0
    ) -> AsyncIterator[tuple[int, bytes]]:
        """Yield ``(offset, data)`` from ``offset`` to the end, each chunk
        checked against its signed digest before it leaves the store. Follows
        a download in progress chunk by chunk."""
        dl = self._downloads.get(package)
        if dl is not None:
            m, path = dl.manifest, dl.path
        else:
            found = self.manifest(package)
            if found is None:
                raise StoreError(f"{package} is not in the store")
            m, dl, path = found, None, self.data_path(package)
        if offset % m.chunk_size or offset > m.size:
            raise StoreError(f"{package}: offset {offset} is not a chunk boundary")
        fd = os.open(path, os.O_RDONLY)
        self._readers[package] = self._readers.get(package, 0) + 1
        loop = asyncio.get_running_loop()
        ahead: deque[asyncio.Future[bytes]] = deque()
        try:
            pos = ahead_pos = offset
            while pos < m.size:
                # Read and check the next chunks in threads while this one is
                # sent, but never beyond what a running download has verified.
                while (
                    len(ahead) < READ_AHEAD
                    and ahead_pos < m.size
                    and (dl is None or dl.done or dl.verified > ahead_pos)
                ):
                    index = ahead_pos // m.chunk_size
                    ahead.append(
                        loop.run_in_executor(None, self._read_chunk, fd, m, index, ahead_pos)
                    )
                    ahead_pos += m.chunk_length(index)
                if not ahead:
                    assert dl is not None
                    await dl.wait_beyond(pos, wait_timeout)
                    if dl.error is not None and dl.verified <= pos:
                        raise StoreError(f"{package}: upstream fetch failed: {dl.error}")
                    continue
                data = await ahead.popleft()
                yield pos, data
                pos += len(data)
        finally:
            for fut in ahead:  # let reads finish before the descriptor closes
                with contextlib.suppress(BaseException):
                    await fut
            os.close(fd)
            self._readers[package] -= 1

    @staticmethod
    def _read_chunk(fd: int, m: Manifest, index: int, pos: int) -> bytes:
        length = m.chunk_length(index)
        data = os.pread(fd, length, pos)
        if len(data) != length or hashlib.sha256(data).digest() != m.chunks[index]:
            raise CorruptChunk(m.id, pos, "at rest")
        return data
