"""The package store: the server's storehouse, a relay's cache, a client's
downloads. One format everywhere.

A complete package is two files, ``ID.pkg`` (the archive) and ``ID.env``
(the signed manifest envelope). The envelope is written last and deleted
first, so a package whose envelope exists is complete and verified. Both are
written under the store lock (``.lock``, an flock any process writing the
store takes), and clean-up takes the same lock, so an archive without its
envelope found under it is debris from a crash or a failed commit and goes
at once, while one another live process is committing is left alone.
Downloads in progress live in ``partial/`` (see ``download.py``).

An entry whose envelope fails verification (signed by another key,
malformed, or for another package than its name says) is set aside: both
files move to the home's ``quarantine/`` folder, one line is logged with the
package and the reason, and the store reads as if the package were not
there, so one bad file never stops holdings, expiry or reports.

Who uses a package: readers (serving children), the download filling it,
and leases that jobs of this node hold while they fetch, extract and
install it. Expiry and the end of an install delete a package only when
nothing uses it. Expiry is by this node's clock: an expired package is
never served (checked at every chunk) nor stored again.

Verification at rest: each chunk is hashed once on the way in (``download``)
and a complete package is re-hashed only when it may have changed at rest:
the first time this process serves or installs it (after a restart, or a
package an admin command stored), when the data file's identity (inode,
size, mtime, ctime) is not the one recorded when it was last verified, and
once ``RECHECK_AFTER`` has passed. Any write to the file through the
filesystem moves its ctime, so tampering after verification is caught by
the next serve or install. A serve that finds the package unverified hashes
each chunk as it reads it (and records the package as verified once a whole
pass from byte zero matched); a verified package is served without hashing.

Fan-out: chunks read for serving go through a small shared cache
(``ChunkCache``), so children fetching the same package at about the same
time share one disk read (and one check) per chunk, and a download in
progress puts each verified chunk there as it is written, so a relay
forwards chunks to waiting children from memory (cut-through).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from protocol import is_package_id

from ..errors import CorruptChunk, ExpiredPackage, ManifestError, StoreError
from ..util.fsutil import FileId, atomic_write, file_lock, fsync_dir
from .download import Download
from .manifest import Envelopes, Manifest

READ_AHEAD = 2  # chunks read and checked ahead of the one being sent
#: A package verified this long ago is hashed again at its next serve or install.
RECHECK_AFTER = 24 * 3600.0
#: Bytes of recently read or received chunks kept for other readers (fan-out,
#: cut-through); shared by the whole store, so memory does not grow per peer.
CACHE_BYTES = 4 * 1024 * 1024
log = structlog.get_logger("rdsd.store")
#: A chunk's bytes as they are passed around without copying.
Data = bytes | memoryview


@dataclass
class Reading:
    """One package read by a thread (a lane serving it, ``net/lane.py``):
    opened and closed on the event loop (``Store.open_reading`` and
    ``close_reading``), read in the thread. It follows a download in
    progress as ``Store.chunks`` does, by the download's own condition."""

    manifest: Manifest
    fd: int
    download: Download | None
    check: bool
    ident: FileId | None

    def ready(self, pos: int, wait: float) -> int:
        """From the reading thread: the length of the chunk at ``pos``, once
        a download in progress has verified it (waiting up to ``wait``) and
        while the package has not expired."""
        m = self.manifest
        length = m.chunk_length(pos // m.chunk_size)
        dl = self.download
        while dl is not None and dl.verified < pos + length and not dl.done:
            if dl.error is not None:
                raise StoreError(f"{m.id}: upstream fetch failed: {dl.error}")
            if not dl.wait_verified(pos + length - 1, wait):
                raise TimeoutError(f"{m.id}: no new verified data for {wait:.0f}s")
        if Store.expired(m):
            raise ExpiredPackage(f"{m.id} expired at {_iso(m.expires)}")
        return length

    def read(self, pos: int, into: bytearray, wait: float) -> memoryview:
        """From the reading thread: the chunk at ``pos``, read into ``into``
        (no new buffer per chunk), checked against its signed digest when
        the package is not verified at rest (``ready`` first)."""
        length = self.ready(pos, wait)
        view = memoryview(into)[:length]
        self.read_into(view, pos)
        index = pos // self.manifest.chunk_size
        if self.check and hashlib.sha256(view).digest() != self.manifest.chunks[index]:
            raise CorruptChunk(self.manifest.id, pos, "at rest")
        return view

    def read_into(self, view: memoryview, pos: int) -> None:
        """Fill ``view`` from the file at ``pos``; a short file is corrupt."""
        if os.preadv(self.fd, [view], pos) != len(view):
            raise CorruptChunk(self.manifest.id, pos, "at rest (short)")


class ChunkCache:
    """Recently read or received chunks, shared by every reader of a store.

    An entry is a future, so readers asking for a chunk that is still being
    read wait for that one read instead of starting another. Entries are
    evicted oldest first beyond ``limit`` bytes (chunks still being read
    count at their manifest length); a reader that falls that far behind
    reads from disk again."""

    def __init__(self, limit: int = CACHE_BYTES) -> None:
        self.limit = limit
        self._entries: OrderedDict[tuple[str, int], tuple[asyncio.Future[Data], int]] = (
            OrderedDict()
        )
        self._bytes = 0

    def get(self, package: str, index: int) -> asyncio.Future[Data] | None:
        entry = self._entries.get((package, index))
        if entry is None:
            return None
        fut = entry[0]
        if fut.done() and (fut.cancelled() or fut.exception() is not None):
            self._drop((package, index))
            return None
        return fut

    def put(self, package: str, index: int, fut: asyncio.Future[Data], length: int) -> None:
        key = (package, index)
        self._drop(key)
        self._entries[key] = (fut, length)
        self._bytes += length
        while self._bytes > self.limit and len(self._entries) > 1:
            self._drop(next(iter(self._entries)))

    def put_data(self, package: str, index: int, data: Data) -> None:
        fut: asyncio.Future[Data] = asyncio.get_running_loop().create_future()
        fut.set_result(data)
        self.put(package, index, fut, len(data))

    def forget(self, package: str) -> None:
        """Drop every chunk of ``package`` (it changed, or is gone)."""
        for key in [k for k in self._entries if k[0] == package]:
            self._drop(key)

    def _drop(self, key: tuple[str, int]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry[1]


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


class Store:
    """Complete packages plus the downloads in progress, in one directory."""

    def __init__(
        self,
        root: Path,
        envelopes: Envelopes,
        refetchable: bool = True,
        quarantine_dir: Path | None = None,
    ) -> None:
        self.root = root
        # Entries that failed verification go here (HOME/quarantine by default).
        self.quarantine_dir = quarantine_dir or root.parent / "quarantine"
        # A relay or client can fetch a damaged package again from its parent;
        # the server's storehouse cannot, so it leaves a bad package in place.
        self.refetchable = refetchable
        self.partial_dir = root / "partial"
        self.envelopes = envelopes
        self._downloads: dict[str, Download] = {}
        self._readers: dict[str, int] = {}
        # Readers among them that read through the chunk cache (``chunks``).
        self._followers: dict[str, int] = {}
        self._leases: dict[str, list[str]] = {}
        # package -> (data file identity, monotonic time) when it last matched
        # its manifest in full, in this process.
        self._verified: dict[str, tuple[FileId, float]] = {}
        self.cache = ChunkCache()
        #: Chunks read from disk to serve (a test hook: fan-out reads each once).
        self.disk_reads = 0
        # Called when the set of packages or their expiry may have changed,
        # or a package stopped being used (the expiry timer re-arms).
        self.watchers: list[Callable[[], None]] = []

    def verify(self, package: str) -> None:
        """Re-check a complete package against its manifest, always: raises
        CorruptChunk at the first bad chunk. A full match is recorded, so
        serves and installs after it need not hash again (``verified``)."""
        m = self.manifest(package)
        if m is None:
            raise StoreError(f"{package} is not in the store")
        # The signed chunk digests cover every byte, so one pass suffices.
        with self.data_path(package).open("rb") as f:
            # Taken before reading: a write during the pass moves the ctime,
            # so the recorded identity no longer matches and it is hashed again.
            ident = FileId.of(f.fileno())
            for index in range(len(m.chunks)):
                data = f.read(m.chunk_length(index))
                if hashlib.sha256(data).digest() != m.chunks[index]:
                    self._verified.pop(package, None)
                    raise CorruptChunk(package, index * m.chunk_size, "at rest")
            if f.read(1):
                self._verified.pop(package, None)
                raise CorruptChunk(package, m.size, "trailing bytes at rest")
        self.mark_verified(package, ident)

    async def verify_at_rest(self, package: str) -> bool:
        """Re-check ``package`` (in a thread) unless it was verified in this
        process and its file has not changed since (nor ``RECHECK_AFTER``
        passed); what runs before an install. True if it hashed the package."""
        if self.verified(package):
            return False
        await asyncio.get_running_loop().run_in_executor(None, self.verify, package)
        return True

    async def verify_stored(self, every: float = RECHECK_AFTER) -> None:
        """Re-check, one at a time in a thread, every complete package not
        known good: all of them after a start, then each ``every`` seconds
        those verified longest ago. A bad one is quarantined (where the node
        can fetch it again) and logged, so a damaged package is found before
        a child asks for it and a serve rarely has to hash."""
        loop = asyncio.get_running_loop()
        while True:
            for package in self.ids():
                if self.verified(package) or package in self._downloads:
                    continue
                try:
                    await loop.run_in_executor(None, self.verify, package)
                except CorruptChunk as exc:
                    log.error(
                        "store.corrupt_at_rest",
                        store=str(self.root),
                        package=package,
                        offset=exc.offset,
                    )
                    if not self._readers.get(package, 0):
                        self.quarantine(package, exc.offset)
                except (StoreError, OSError) as exc:  # deleted meanwhile, unreadable
                    log.warning(
                        "store.verify_failed",
                        store=str(self.root),
                        package=package,
                        reason=str(exc),
                    )
            await asyncio.sleep(every)

    def verified(self, package: str) -> bool:
        """Did the whole package match its manifest in this process, and is
        its data file still the one that matched?"""
        known = self._verified.get(package)
        if known is None:
            return False
        ident, when = known
        try:
            now_ident = FileId.of(self.data_path(package))
        except FileNotFoundError:
            now_ident = None
        if now_ident != ident or time.monotonic() - when > RECHECK_AFTER:
            self.unverified(package)
            return False
        return True

    def mark_verified(self, package: str, ident: FileId) -> None:
        """Every chunk of ``package`` matched while its file was ``ident``."""
        self._verified[package] = (ident, time.monotonic())

    def unverified(self, package: str) -> None:
        """Forget that ``package`` was verified: its next serve or install hashes it."""
        self._verified.pop(package, None)
        self.cache.forget(package)

    @property
    def lock_path(self) -> Path:
        return self.root / ".lock"

    @contextlib.contextmanager
    def committing(self, wait: bool = True) -> Iterator[bool]:
        """Hold the store lock (all processes) for a commit or a clean-up;
        yields whether it was taken (always, with ``wait``). Held for a
        rename and a small write only, so waiting is short."""
        self.root.mkdir(parents=True, exist_ok=True)
        with file_lock(self.lock_path, wait=wait) as mine:
            yield mine

    def prepare(self) -> None:
        """Create the layout and remove debris a crash may have left. Other
        processes (the daemon, an admin command, rdsft) may be writing this
        store right now, so only files that cannot be theirs go: temporary
        files of dead processes, and archives without an envelope while no
        process is committing (the store lock is free)."""
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        for path in self.root.iterdir():
            dead = not _pid_alive(path.name.rsplit("-", 1)[-1])
            if path.name.startswith(".") and ".tmp-" in path.name and dead:
                path.unlink(missing_ok=True)
        with self.committing(wait=False) as mine:
            if mine:
                for path in self.root.glob("*.pkg"):
                    self._drop_debris(path.name[: -len(".pkg")])
        fsync_dir(self.root)

    def _drop_debris(self, package: str) -> None:
        """Under the store lock: an archive without its envelope is debris."""
        if not is_package_id(package) or package in self._downloads:
            return
        path = self.data_path(package)
        if path.exists() and not self.envelope_path(package).exists():
            log.warning("store.debris_removed", store=str(self.root), file=str(path))
            path.unlink(missing_ok=True)

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
        """The verified manifest of a complete package (cached by envelope).
        An envelope that fails verification is set aside and the package
        counts as absent (a node with a parent fetches it again)."""
        env = self.envelope(package)
        if env is None:
            return None
        try:
            return self.envelopes.open_for(env, package)
        except ManifestError as exc:
            self.set_aside(package, env, f"stored manifest rejected: {exc}")
            return None

    def set_aside(self, package: str, envelope: bytes, reason: str) -> None:
        """Move ``package``'s files to the quarantine folder, under the store
        lock and only if its envelope is still ``envelope`` (another process
        may have replaced or set it aside meanwhile); log it once."""
        moved: list[str] = []
        with self.committing():
            if self.envelope(package) != envelope:
                return
            self.quarantine_dir.mkdir(mode=0o700, exist_ok=True)
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            # Envelope first: from that moment the package no longer counts.
            for path in (self.envelope_path(package), self.data_path(package)):
                target = self.quarantine_dir / f"{path.name}.{stamp}-{os.getpid()}"
                with contextlib.suppress(FileNotFoundError):
                    os.replace(path, target)
                    moved.append(str(target))
            fsync_dir(self.root)
            fsync_dir(self.quarantine_dir)
        log.error(
            "store.set_aside",
            store=str(self.root),
            package=package,
            reason=reason,
            moved_to=moved,
        )
        self.notify()

    def manifests(self) -> list[Manifest]:
        out = []
        for package in self.ids():
            m = self.manifest(package)
            if m is not None:
                out.append(m)
        return out

    def followed(self, package: str) -> bool:
        """Is a session serving ``package`` right now? Its chunks are then
        worth keeping in memory (``ChunkCache``); a lane's thread reads the
        file, from the page cache, and needs no copy kept."""
        return self._followers.get(package, 0) > 0

    def in_use(self, package: str, besides: str | None = None, download: bool = True) -> bool:
        """Is ``package`` read, downloaded (unless ``download`` is false) or
        leased (by a holder other than ``besides``) in this process?"""
        holders = self._leases.get(package, [])
        return (
            self._readers.get(package, 0) > 0
            or (download and package in self._downloads)
            or any(h != besides for h in holders)
        )

    @contextlib.contextmanager
    def lease(self, package: str, holder: str) -> Iterator[None]:
        """``holder`` (a job) uses ``package``: expiry and other jobs' clean-up
        leave it alone until the block ends."""
        self._leases.setdefault(package, []).append(holder)
        try:
            yield
        finally:
            holders = self._leases[package]
            holders.remove(holder)
            if not holders:
                del self._leases[package]
            self.notify()

    def notify(self) -> None:
        for watcher in self.watchers:
            watcher()

    @staticmethod
    def expired(m: Manifest, now: float | None = None) -> bool:
        """By this node's clock, the node that enforces the expiry."""
        return m.expires <= (time.time() if now is None else now)

    # -- writing -------------------------------------------------------------

    def replace_envelope(self, package: str, envelope: bytes) -> None:
        """Swap in a re-signed manifest (new keep duration) for the same bytes."""
        atomic_write(self.envelope_path(package), envelope)
        self.notify()

    def delete(self, package: str) -> None:
        """Envelope first: from that moment the package no longer counts."""
        self.unverified(package)
        for path in (self.envelope_path(package), self.data_path(package)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        fsync_dir(self.root)
        self.notify()

    def quarantine(self, package: str, offset: int) -> None:
        """A complete package turned out to hold a bad chunk at ``offset``:
        take it out of service and keep its good prefix as a partial
        download, so a node with a parent fetches only the rest again."""
        env = self.envelope(package)
        self.unverified(package)
        if not self.refetchable or env is None or package in self._downloads:
            return
        part = self.partial_dir / f"{package}.part"
        self.envelope_path(package).unlink()
        os.replace(self.data_path(package), part)
        os.truncate(part, offset)
        atomic_write(self.partial_dir / f"{package}.env", env)
        fsync_dir(self.root)
        log.error("store.quarantined", store=str(self.root), package=package, offset=offset)

    def discard_partial(self, package: str) -> None:
        """Remove what a download of ``package`` left in ``partial/`` (none
        is running)."""
        if package in self._downloads:
            return
        for path in (self.partial_dir / f"{package}.part", self.partial_dir / f"{package}.env"):
            path.unlink(missing_ok=True)

    def active(self, package: str) -> Download | None:
        return self._downloads.get(package)

    async def begin_download(self, envelope: bytes, manifest: Manifest, resume: bool) -> Download:
        """Start receiving ``manifest``'s package, or join the one in progress
        so a package is fetched once however many want it."""
        current = self._downloads.get(manifest.id)
        if current is not None:
            return current
        if self.expired(manifest):
            raise ExpiredPackage(f"{manifest.id} expired at {_iso(manifest.expires)}")
        with self.committing():
            # An archive a failed commit left without its envelope goes now,
            # not at some later start.
            self._drop_debris(manifest.id)
        self.unverified(manifest.id)
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
    ) -> AsyncGenerator[tuple[int, Data], None]:
        """Yield ``(offset, data)`` from ``offset`` to the end. Follows a
        download in progress chunk by chunk (its chunks were checked as they
        arrived). A complete package not verified in this process since its
        file last changed has each chunk checked against its signed digest
        before it leaves the store; a verified one is read without hashing."""
        reading = self.open_reading(package, offset)
        m, dl = reading.manifest, reading.download
        self._followers[package] = self._followers.get(package, 0) + 1
        whole = False
        ahead: deque[asyncio.Future[Data]] = deque()
        # Reads this reader started and that still run (they use its descriptor).
        mine: set[asyncio.Future[Data]] = set()
        try:
            pos = ahead_pos = offset
            while pos < m.size:
                # Read the next chunks in threads while this one is sent, but
                # never beyond what a running download has verified.
                while (
                    len(ahead) < READ_AHEAD
                    and ahead_pos < m.size
                    and (dl is None or dl.done or dl.verified > ahead_pos)
                ):
                    index = ahead_pos // m.chunk_size
                    ahead.append(self._chunk(reading, index, ahead_pos, mine))
                    ahead_pos += m.chunk_length(index)
                if not ahead:
                    assert dl is not None
                    await dl.wait_beyond(pos, wait_timeout)
                    if dl.error is not None and dl.verified <= pos:
                        raise StoreError(f"{package}: upstream fetch failed: {dl.error}")
                    continue
                data = await ahead.popleft()
                if self.expired(m):
                    raise ExpiredPackage(f"{package} expired at {_iso(m.expires)}")
                yield pos, data
                pos += len(data)
            whole = offset == 0
        finally:
            # Reads this reader started use its descriptor: let them finish first.
            for fut in list(mine):
                with contextlib.suppress(BaseException):
                    await fut
            self._followers[package] -= 1
            self.close_reading(reading, whole)

    def open_reading(self, package: str, offset: int) -> Reading:
        """On the loop: open ``package`` for a thread to read from ``offset``
        (the same checks as ``chunks``); it counts as a reader until
        ``close_reading``, so expiry spares it meanwhile."""
        dl = self._downloads.get(package)
        if dl is not None:
            m, path = dl.manifest, dl.path
        else:
            found = self.manifest(package)
            if found is None:
                raise StoreError(f"{package} is not in the store")
            m, path = found, self.data_path(package)
        if offset % m.chunk_size or offset > m.size:
            raise StoreError(f"{package}: offset {offset} is not a chunk boundary")
        if self.expired(m):
            raise ExpiredPackage(f"{package} expired at {_iso(m.expires)}")
        fd = os.open(path, os.O_RDONLY)
        check = dl is None and not self.verified(package)
        self._readers[package] = self._readers.get(package, 0) + 1
        return Reading(m, fd, dl, check, FileId.of(fd) if check else None)

    def close_reading(self, reading: Reading, whole: bool) -> None:
        """On the loop, once the thread is done with ``reading``; ``whole``:
        it read every chunk from byte zero (so checked all of them, if it
        had to)."""
        package = reading.manifest.id
        if whole and reading.ident is not None:
            self.mark_verified(package, reading.ident)
        os.close(reading.fd)
        self._readers[package] -= 1
        if self.expired(reading.manifest):
            self.notify()

    def _chunk(
        self, reading: Reading, index: int, pos: int, mine: set[asyncio.Future[Data]]
    ) -> asyncio.Future[Data]:
        """Chunk ``index``: from the shared cache when another reader (or the
        download) has it, else read (and checked if it must be) in a thread."""
        m = reading.manifest
        fut = self.cache.get(m.id, index)
        if fut is not None:
            return fut
        fut = asyncio.get_running_loop().run_in_executor(None, self._read_chunk, reading, pos)
        fut.add_done_callback(_retrieved)
        mine.add(fut)
        fut.add_done_callback(mine.discard)
        self.cache.put(m.id, index, fut, m.chunk_length(index))
        return fut

    def _read_chunk(self, reading: Reading, pos: int) -> Data:
        """In a thread: the chunk at ``pos`` (already verified if a download
        is filling it), into a buffer of its own, which the cache keeps."""
        self.disk_reads += 1
        length = reading.manifest.chunk_length(pos // reading.manifest.chunk_size)
        return reading.read(pos, bytearray(length), 0.0)


def _retrieved(fut: asyncio.Future[Data]) -> None:
    """A shared read's failure is seen by whoever awaits it, maybe nobody."""
    if not fut.cancelled():
        fut.exception()


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
