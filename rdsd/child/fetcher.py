"""Getting packages from the parent into the store.

One fetch per package however many jobs or children want it at the same
moment. Below the server (and between relays) a failed attempt resumes from
the verified offset; a client below a relay starts over (``Uplink.resumes``).

Each fetch reports on the node's event bus: ``TransferProgress`` about once
a second while bytes arrive (never more often, so a fast link does not fill
subscribers' buffers) and once more at 100%, then ``PackageStored``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import structlog

from ..config import NodeConfig
from ..domain import HelloPurpose
from ..errors import (
    DiskFull,
    ExpiredPackage,
    LaneRefused,
    StoreError,
    TransferFailed,
    TransferPaused,
)
from ..events import EventBus, PackageStored, TransferProgress
from ..net.lane import receive_lane
from ..net.session import Session
from ..net.transfer import receive
from ..packages.download import Download
from ..packages.manifest import Manifest
from ..packages.store import Store
from ..util.backoff import Backoff
from .gate import TransferGate
from .uplink import Uplink

log = structlog.get_logger("rdsd.runner")
#: At most this many seconds between TransferProgress events of one fetch.
EVENT_INTERVAL = 1.0


def _no_owners(package: str) -> list[str]:
    return []


class Fetcher:
    """Fetches packages from the parent, once per package.

    ``owners(package)`` names the jobs a fetch is for, so each progress
    event can carry its job (None when no job of this node owns it, as when
    a relay fetches for a child)."""

    def __init__(
        self,
        cfg: NodeConfig,
        store: Store,
        link: Uplink,
        bus: EventBus | None = None,
        owners: Callable[[str], list[str]] = _no_owners,
        gate: TransferGate | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.link = link
        self.bus = bus if bus is not None else EventBus(name=cfg.name)
        self.owners = owners
        # Limits and windows: the rate FETCH asks for, and when to fetch.
        self.gate = gate if gate is not None else TransferGate(cfg)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # Set once a download of the package is open for readers to follow.
        self._begun: dict[str, asyncio.Event] = {}
        # Fetches dropped because nobody wants the package any more.
        self._dropped: set[str] = set()

    def start(self, manifest: Manifest, envelope: bytes) -> asyncio.Task[None]:
        task = self._tasks.get(manifest.id)
        if task is None or task.done():
            self._begun[manifest.id] = asyncio.Event()
            self._dropped.discard(manifest.id)
            task = asyncio.create_task(
                self._obtain(manifest, envelope), name=f"fetch-{manifest.id}"
            )
            self._tasks[manifest.id] = task
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
        return task

    def drop(self, package: str) -> None:
        """Nobody here wants ``package`` any more (its job was cancelled):
        stop fetching it and remove what was received."""
        task = self._tasks.get(package)
        if task is not None and not task.done():
            self._dropped.add(package)
            task.cancel()

    async def stop(self) -> None:
        """Stop every fetch (the node is stopping). Each keeps its verified
        prefix, as after a lost link; a lane's thread has ended when this
        returns, so nothing writes into the store afterwards."""
        running = [task for task in self._tasks.values() if not task.done()]
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    async def get(self, manifest: Manifest, envelope: bytes) -> None:
        if self.store.has(manifest.id):
            return
        await asyncio.shield(self.start(manifest, envelope))

    async def started(self, manifest: Manifest, envelope: bytes, timeout: float = 10.0) -> bool:
        """Start fetching and return once readers can follow the download
        (or the package is complete); False if that did not happen in time."""
        task = self.start(manifest, envelope)
        if self.store.has(manifest.id) or self.store.active(manifest.id):
            return True
        begun = asyncio.create_task(self._begun[manifest.id].wait())
        try:
            await asyncio.wait({task, begun}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            begun.cancel()
        return self.store.has(manifest.id) or self.store.active(manifest.id) is not None

    async def _obtain(self, manifest: Manifest, envelope: bytes) -> None:
        try:
            await self._attempts(manifest, envelope)
        finally:
            self.gate.forget(manifest.id)
            if manifest.id in self._dropped:
                # Wherever the cancel landed (even while the partial file was
                # being opened), nothing of a dropped fetch stays.
                self.store.discard_partial(manifest.id)

    async def _attempts(self, manifest: Manifest, envelope: bytes) -> None:
        cfg = self.cfg
        bound = log.bind(node=cfg.name, package=manifest.id)
        backoff = Backoff(cfg.reconnect_min, cfg.reconnect_max)
        attempt = 0
        while not self.store.has(manifest.id):
            attempt += 1
            await self.gate.wait_transfer(manifest.id)
            try:
                session = await self.link.wait_session(cfg.idle_timeout)
            except TimeoutError:
                raise TransferFailed(f"parent unreachable: {self.link.last_error}") from None
            resume = self.link.resumes
            try:
                dl = await self.store.begin_download(envelope, manifest, resume=resume)
            except (DiskFull, ExpiredPackage) as exc:
                raise TransferFailed(str(exc), retryable=False) from None
            except StoreError as exc:
                # Another process (the daemon, or rdsft) is fetching it: wait.
                if attempt >= cfg.retry_limit * 10:
                    raise TransferFailed(str(exc)) from None
                bound.info("fetch.waiting", reason=str(exc))
                await asyncio.sleep(min(cfg.reconnect_max, 1.0))
                continue
            self._begun[manifest.id].set()
            progress = _Progress(self, manifest, dl.verified, bound)
            try:
                await self._receive(session, dl, progress, resume, bound)
                progress.finished()
                return
            except TransferPaused as exc:
                # A window closed: not a failure; the verified prefix waits
                # for the window (below a relay a client starts over, as ever).
                dl.fail(str(exc), keep_partial=resume)
                bound.info("fetch.paused", reason=str(exc), resume_from=dl.verified)
                attempt -= 1
                continue
            except TransferFailed as exc:
                if self.gate.held_upstream(manifest.id, str(exc)):
                    attempt -= 1  # the relay's window, not a failure: ask again later
                final = not exc.retryable or attempt >= cfg.retry_limit
                # The last failure leaves nothing behind; earlier ones keep
                # the verified prefix for the next attempt to resume from.
                dl.fail(str(exc), keep_partial=resume and not final)
                bound.warning(
                    "fetch.failed",
                    attempt=attempt,
                    reason=str(exc),
                    resume_from=dl.verified if resume and not final else 0,
                )
                if final:
                    raise
            except BaseException:
                # Stopping keeps the prefix for the next start; a dropped
                # fetch (its job cancelled) leaves nothing.
                dl.fail("interrupted", keep_partial=resume and manifest.id not in self._dropped)
                raise
            await backoff.wait()

    async def _receive(
        self, session: Session, dl: Download, progress: _Progress, resume: bool, bound: Any
    ) -> None:
        """One attempt: over a lane when the package is large enough and
        the parent takes lanes, else (or when the lane cannot be opened)
        over the session."""
        cfg, link, m = self.cfg, self.link, dl.manifest
        every = min(cfg.progress_interval, EVENT_INTERVAL)
        rate = self.gate.rate(m.id)
        pause = self.gate.pause_check(m.id, resumes=resume)
        if link.lanes and 0 < cfg.lane_min <= m.size - dl.verified:
            assert cfg.parent is not None
            try:
                await receive_lane(
                    cfg.parent,
                    link.ctx,
                    link.hello(session.peer, HelloPurpose.LANE),
                    session.peer.name,
                    dl,
                    cfg.idle_timeout,
                    cfg.name,
                    cfg.handshake_timeout,
                    progress.report,
                    every,
                    rate,
                    pause,
                )
                return
            except LaneRefused as exc:
                # Not for this session any more: the session carries it.
                link.lanes = False
                bound.warning("fetch.lane_refused", reason=str(exc))
        await receive(
            session,
            link.router,
            dl,
            cfg.idle_timeout,
            cfg.name,
            progress.report,
            every,
            rate,
            pause,
        )

    def publish_progress(self, package: str, done: int, total: int, rate: float) -> None:
        """One TransferProgress per job the fetch is for (or one without a job)."""
        name = self.cfg.name
        jobs: list[str | None] = [*self.owners(package)] or [None]
        for job in jobs:
            self.bus.publish(
                TransferProgress(
                    source=name,
                    job=job,
                    node=name,
                    package=package,
                    done=done,
                    total=total,
                    rate=rate,
                )
            )


class _Progress:
    """One attempt's progress: events at most every ``EVENT_INTERVAL``
    seconds with the rate since the previous one, a log line every
    ``progress_interval``, and a last event (average rate) at the end."""

    def __init__(self, fetcher: Fetcher, manifest: Manifest, offset: int, bound: Any) -> None:
        self.fetcher = fetcher
        self.manifest = manifest
        self.bound = bound
        self.start = self.at = self.logged = time.monotonic()
        self.offset = self.done = offset

    def report(self, done: int, total: int) -> None:
        if done == self.done:
            return  # chunks arrived but none is written yet: nothing to tell
        now = time.monotonic()
        rate = (done - self.done) / max(now - self.at, 1e-6)
        self.at, self.done = now, done
        self.fetcher.publish_progress(self.manifest.id, done, total, rate)
        if now - self.logged >= self.fetcher.cfg.progress_interval:
            self.logged = now
            self.bound.info(
                "fetch.progress",
                bytes=done,
                size=total,
                percent=round(100 * done / max(total, 1), 1),
            )

    def finished(self) -> None:
        m = self.manifest
        rate = (m.size - self.offset) / max(time.monotonic() - self.start, 1e-6)
        self.fetcher.publish_progress(m.id, m.size, m.size, rate)
        self.fetcher.bus.publish(
            PackageStored(
                source=self.fetcher.cfg.name, package=m.id, size=m.size, expires=m.expires
            )
        )
