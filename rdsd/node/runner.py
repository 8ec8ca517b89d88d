"""Doing this node's own jobs: fetch, then store, offer or install.

The daemon and ``rdsft`` share this code and may run at the same time, so
each job is claimed with an exclusive file lock (released by the kernel if
the process dies) and its state is re-read after the lock is taken: a job is
done once, by whoever got there first.

Jobs of one package on one node share the package: one fetch, a lease on
the store entry for as long as a job works with it, installs one at a time
in the order they came, and the archive deleted only when no job on the node
needs it any more. An install is an action with a durable record
(``install.py``): after a crash the node adopts a run still going or reports
the real outcome of one that ended, and never starts a second run beside it.
A state that cannot be recorded (a full disk under the database) is tried
again with backoff until it is, so no destination is left ``transferring``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import structlog

from ..child.fetcher import Fetcher
from ..child.gate import RECHECK
from ..config import NodeConfig, iso
from ..domain import Dest, DestState, Job, JobType, Role, progress_detail
from ..errors import (
    IllegalTransition,
    ManifestError,
    RdsdError,
    StoreError,
    TransferFailed,
    WindowClosed,
)
from ..packages.manifest import Envelopes, Manifest
from ..packages.store import Store
from ..state import JobDB
from ..util.backoff import Backoff
from ..util.fsutil import file_lock
from ..util.parse import format_rate
from ..util.windows import describe_hold
from .install import (
    INTERRUPTED,
    EarlyExtract,
    InstallResult,
    forget,
    install,
    read_outcome,
    settle,
)

log = structlog.get_logger("rdsd.runner")


class Superseded(RdsdError):
    """The destination was moved on elsewhere (cancelled) while this node
    worked on it: stop without reporting."""


@contextlib.contextmanager
def job_lock(locks: Path, job: str, wait: bool = False) -> Iterator[bool]:
    """Yield True if this process now owns ``job``; False if another does."""
    with file_lock(locks / f"{job}.lock", wait=wait) as mine:
        yield mine


class Runner:
    """Runs jobs addressed to this node."""

    def __init__(
        self,
        cfg: NodeConfig,
        db: JobDB,
        store: Store,
        envelopes: Envelopes,
        fetcher: Fetcher,
        changed: Callable[[], None],
    ) -> None:
        self.cfg = cfg
        self.db = db
        self.store = store
        self.envelopes = envelopes
        self.fetcher = fetcher
        self.changed = changed
        self._running: dict[str, asyncio.Task[Dest | None]] = {}
        # One install of a package at a time on this node, in arrival order.
        # (lock, how many hold or wait for it): forgotten when nobody does.
        self._turns: dict[str, tuple[asyncio.Lock, int]] = {}
        self._stopping = False

    def kick(self) -> None:
        """Start every due job of ours that is not already running here."""
        for job, _ in self.db.own_work(self.cfg.name, time.time(), waiting_only=True):
            self.spawn(job)

    def spawn(self, job: Job) -> asyncio.Task[Dest | None]:
        task = self._running.get(job.id)
        if task is None or task.done():
            task = asyncio.create_task(self.run(job), name=f"job-{job.id}")
            self._running[job.id] = task
        return task

    def cancel(self, jid: str) -> None:
        task = self._running.get(jid)
        if task is not None:
            task.cancel()
        job = self.db.job(jid)
        if job is not None and not self.needed(job.package, jid, download=False):
            self.fetcher.drop(job.package)

    async def stop(self) -> None:
        """The node stops: a running install is stopped too (its supervisor
        kills the command and records that) and reported ``failed:
        interrupted``, unless it ended by itself first."""
        self._stopping = True
        for task in self._running.values():
            task.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)

    def _set(self, job: Job, state: DestState, detail: str = "") -> None:
        try:
            self.db.change(
                job.id,
                self.cfg.name,
                state,
                detail,
                self.cfg.name,
                report=True,
                package=job.package,
            )
        except IllegalTransition as exc:
            log.info("job.superseded", node=self.cfg.name, job=job.id, reason=str(exc))
            raise Superseded(str(exc)) from None
        log.info(
            "job.state",
            node=self.cfg.name,
            job=job.id,
            package=job.package,
            state=state,
            detail=detail,
        )
        self.changed()

    async def _record(self, job: Job, state: DestState, detail: str = "") -> None:
        """``_set`` that does not give up when the database cannot be written
        (a full disk): the change is tried again with backoff until it is
        recorded, so the outcome reaches the parent once space returns."""
        backoff = Backoff(self.cfg.reconnect_min, min(self.cfg.reconnect_max, 5.0))
        while True:
            try:
                self._set(job, state, detail)
                return
            except sqlite3.OperationalError as exc:
                log.warning(
                    "state.write_failed",
                    node=self.cfg.name,
                    job=job.id,
                    package=job.package,
                    state=state,
                    reason=str(exc),
                    retry_in=round(backoff.current, 2),
                )
                await backoff.wait()

    async def run(self, job: Job, wait_lock: bool = False) -> Dest | None:
        with job_lock(self.cfg.paths.locks, job.id, wait=wait_lock) as mine:
            if not mine:
                return None
            dest = self.db.dest(job.id, self.cfg.name)
            if dest is None or dest.final:
                return dest
            try:
                if dest.state is DestState.INSTALLING and await self._adopt(job):
                    return self.db.dest(job.id, self.cfg.name)
                with self.store.lease(job.package, job.id):
                    await self._do(job)
            except Superseded:
                pass
            except WindowClosed as exc:
                # Outside its window, in a process that does not wait: the
                # destination says until when, and the daemon carries it on.
                with contextlib.suppress(Superseded):
                    await self._record(job, DestState.WAITING, str(exc))
            except Exception as exc:
                log.exception("job.crashed", node=self.cfg.name, job=job.id)
                with contextlib.suppress(Superseded):
                    await self._record(job, DestState.FAILED, f"internal error: {exc!r}")
            return self.db.dest(job.id, self.cfg.name)

    async def _adopt(self, job: Job) -> bool:
        """The destination says ``installing`` but nothing here runs it (the
        node restarted): take the real outcome of the run that was going,
        waiting for it if it still runs. False if it never started. It
        takes its package's turn like any install: none starts beside it."""
        async with self._turn(job.package):
            with self.store.lease(job.package, job.id):
                return await self._adopted(job)

    async def _adopted(self, job: Job) -> bool:
        dest = self.db.dest(job.id, self.cfg.name)
        try:
            done = await settle(self.cfg.paths.work, job.id, lambda: self._stopping)
        except asyncio.CancelledError:
            if self._stopping:
                self._after_stop(job, job.package)
            raise
        if done is None or dest is None or done.generation != dest.generation:
            return False
        log.info(
            "install.settled",
            node=self.cfg.name,
            job=job.id,
            package=job.package,
            ok=done.result.ok,
            detail=done.result.detail,
        )
        await self._outcome(job, done.result)
        return True

    async def _outcome(self, job: Job, result: InstallResult) -> None:
        """Record an install's outcome, then drop its traces (but the log)
        and the package if no other job here needs it."""
        if result.ok:
            await self._record(job, DestState.INSTALLED, result.detail)
        else:
            await self._record(job, DestState.FAILED, result.detail)
        # In a thread: the run's tree is the whole extracted package, and
        # deleting it on the loop held the outcome's report back (tens of
        # milliseconds for 256 MiB) while it waited to be sent upward.
        await asyncio.to_thread(forget, self.cfg.paths.work, job.id)
        if result.ok:
            self.release(job.package, job.id)

    def needed(self, package: str, job: str, download: bool = True) -> bool:
        """Does anything but ``job`` need ``package`` here: another job of
        this node (open, or offered), or a reader, lease or (with
        ``download``) the download in this process?"""
        if self.store.in_use(package, besides=job, download=download):
            return True
        for other, _ in self.db.own_work(self.cfg.name, float("inf"), waiting_only=False):
            if other.package == package and other.id != job:
                return True
        return self.db.offered(self.cfg.name, package, besides=job)

    def release(self, package: str, job: str) -> None:
        """``job`` is done with ``package``: delete it unless still needed."""
        if not self.needed(package, job):
            self.store.delete(package)

    async def _do(self, job: Job) -> None:
        try:
            manifest = self.envelopes.open(job.manifest)
        except ManifestError as exc:
            await self._record(job, DestState.FAILED, str(exc))
            return
        role = self.cfg.role
        if job.type is JobType.TRANSFER and role is not Role.RELAY:
            await self._record(job, DestState.FAILED, "transfer jobs deliver to relays only")
            return
        if job.type is not JobType.TRANSFER and role is not Role.CLIENT:
            await self._record(job, DestState.FAILED, f"{job.type} jobs deliver to clients only")
            return
        if job.type is JobType.TRANSFER:
            self._refresh_keep(manifest, job.manifest)
        early: EarlyExtract | None = None
        if not self.store.has(manifest.id):
            before = self.db.dest(job.id, self.cfg.name)
            if before is None or before.state is not DestState.INSTALLING:
                await self._record(job, DestState.TRANSFERRING)
            watcher = asyncio.create_task(self._report_progress(job, manifest))
            watcher.add_done_callback(_log_failure(job))
            try:
                if job.type is JobType.INSTALL and await self.fetcher.started(
                    manifest, job.manifest
                ):
                    # Extract while it downloads: the install starts right
                    # after the last byte instead of after a whole extraction.
                    early = EarlyExtract.start(
                        self.store, manifest, self.cfg.paths.work, self.cfg.name, job.id
                    )
                await self.fetcher.get(manifest, job.manifest)
            except TransferFailed as exc:
                await self._record(job, DestState.FAILED, str(exc))
                await _discard(early)
                return
            except BaseException:
                await _discard(early)
                raise
            finally:
                watcher.cancel()
        try:
            current = self.db.dest(job.id, self.cfg.name)
            if current is None or current.state is DestState.CANCELLED:
                return  # cancelled while it was transferring
            if job.type is JobType.TRANSFER:
                await self._record(job, DestState.STORED, f"kept until {iso(manifest.expires)}")
            elif job.type is JobType.OFFER and current.state is not DestState.INSTALLING:
                await self._record(job, DestState.OFFERED)
            else:
                if current.state is not DestState.INSTALLING:
                    await self._install_window(job)
                await self.install(job, manifest, early)
        finally:
            await _discard(early)

    async def _install_window(self, job: Job) -> None:
        """Hold the install until the node's install windows and the job's
        own windows are open together, saying so in the destination's
        detail (``waiting for window 22:00 (install, opens ...)``)."""
        gate = self.fetcher.gate
        pace = self.db.job_pace(job.id)
        shown = ""
        while True:
            now = gate.clock()
            at = gate.install_opens(pace, now)
            if at <= now:
                return
            detail = describe_hold("install", at)
            if not gate.waits:
                raise WindowClosed(detail)
            if detail != shown:
                shown = detail
                await self._record(job, DestState.WAITING, detail)
            await gate.changed(min(at - now, RECHECK) if math.isfinite(at) else RECHECK)

    async def _report_progress(self, job: Job, manifest: Manifest) -> None:
        """On a long transfer, say how far it got, so status tells the truth:
        a human part and the ``[bytes DONE/TOTAL]`` suffix documented in
        protocol/SPEC.md (REPORT), from which every node above computes the
        rate and the end. The human part names the rate asked of the parent
        (``paced at 1MB/s``); a fetch held by a window is ``waiting`` with
        the window's opening, from the moment it is held."""
        gate = self.fetcher.gate
        last = -1
        shown: str | None = None
        while True:
            held = gate.held(manifest.id)
            if held is not None and held != shown:
                with contextlib.suppress(Superseded):
                    self._set(job, DestState.WAITING, held)
                shown, last = held, -1
            elif held is None and shown is not None:
                # The window opened: transferring again, before the first byte.
                with contextlib.suppress(Superseded):
                    self._set(job, DestState.TRANSFERRING, "window open")
                shown = None
            dl = self.store.active(manifest.id)
            if held is None and dl is not None and dl.verified != last:
                last, shown = dl.verified, None
                rate = gate.rate(manifest.id)
                note = f"paced at {format_rate(rate)}" if rate > 0 else ""
                with contextlib.suppress(Superseded):
                    self._set(
                        job,
                        DestState.TRANSFERRING,
                        progress_detail(dl.verified, manifest.size, note),
                    )
            await gate.changed(self.cfg.progress_interval)

    def _refresh_keep(self, manifest: Manifest, envelope: bytes) -> None:
        """A package transferred again with a new keep duration: same bytes,
        newly signed manifest. Take the new expiry without refetching."""
        held = self.store.manifest(manifest.id)
        if held is None or self.store.envelope(manifest.id) == envelope:
            return
        if (held.sha256, held.size, held.chunks) == (
            manifest.sha256,
            manifest.size,
            manifest.chunks,
        ):
            self.store.replace_envelope(manifest.id, envelope)
            log.info(
                "package.keep_changed",
                node=self.cfg.name,
                package=manifest.id,
                expires=iso(manifest.expires),
            )
        else:
            self.store.delete(manifest.id)

    @contextlib.asynccontextmanager
    async def _turn(self, package: str) -> AsyncIterator[None]:
        """Installs of one package on this node run one at a time, in order
        (an asyncio lock wakes its waiters first come, first served)."""
        lock, users = self._turns.get(package, (asyncio.Lock(), 0))
        self._turns[package] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._turns[package]
            if users == 1:
                del self._turns[package]
            else:
                self._turns[package] = (lock, users - 1)

    async def install(
        self, job: Job, manifest: Manifest, early: EarlyExtract | None = None
    ) -> None:
        async with self._turn(manifest.id):
            with self.store.lease(manifest.id, job.id):
                await self._install(job, manifest, early)

    async def _install(
        self, job: Job, manifest: Manifest, early: EarlyExtract | None = None
    ) -> None:
        work = self.cfg.paths.work
        dest = self.db.dest(job.id, self.cfg.name)
        generation = dest.generation if dest is not None else 0
        # An earlier run of this job may still be going (the node restarted,
        # or this is a retry): never start beside it; if it ran for this very
        # attempt, its outcome is the answer.
        done = await settle(work, job.id)
        if done is not None and done.generation == generation:
            await self._outcome(job, done.result)
            return
        try:
            # Hashed again only if it may have changed at rest since every
            # chunk was checked (a restart, a write to the file, a day).
            await self.store.verify_at_rest(manifest.id)
        except StoreError as exc:
            self.store.delete(manifest.id)
            await self._record(job, DestState.FAILED, f"not installed: {exc}")
            return
        await self._record(job, DestState.INSTALLING)
        try:
            result = await install(
                self.store.data_path(manifest.id),
                manifest,
                work,
                self.cfg.name,
                job.id,
                self.cfg.install_timeout,
                generation,
                early,
            )
        except asyncio.CancelledError:
            self._after_stop(job, manifest.id)
            raise
        await self._outcome(job, result)

    def _after_stop(self, job: Job, package: str) -> None:
        """The install was cancelled (the node stops, or the job was
        cancelled) and its supervisor has stopped it. Say what happened: a
        command that ended by itself first keeps its real result; one the
        node stopped is ``failed: interrupted`` (a cancelled destination
        stays cancelled). Whatever is not recorded now is found on disk at
        the next start."""
        work = self.cfg.paths.work
        result = read_outcome(work / f"{job.id}-{package}.exit")
        if result is None:
            return  # still running (it did not stop in time): adopted at the next start
        dest = self.db.dest(job.id, self.cfg.name)
        if dest is None:
            return
        if result.detail == INTERRUPTED and not self._stopping:
            if dest.state is DestState.CANCELLED:
                forget(work, job.id)
            return
        with contextlib.suppress(Superseded, sqlite3.Error):
            state = DestState.INSTALLED if result.ok else DestState.FAILED
            self._set(job, state, result.detail)
            forget(work, job.id)
            log.info(
                "install.stopped",
                node=self.cfg.name,
                job=job.id,
                package=job.package,
                state=state,
                detail=result.detail,
            )

    def recover(self) -> None:
        """After a restart: a transfer that was running simply runs again;
        an install that was running is adopted (``run`` finds out what
        became of it, waiting for it if it still runs)."""
        for job, dest in self.db.own_work(self.cfg.name, float("inf"), waiting_only=False):
            if dest.state is DestState.WAITING:
                continue
            if dest.state is DestState.INSTALLING:
                self.spawn(job)
                continue
            with job_lock(self.cfg.paths.locks, job.id) as mine:
                if not mine:  # rdsft is doing it right now
                    continue
                if dest.state is DestState.TRANSFERRING:
                    self.db.change(
                        job.id,
                        dest.node,
                        DestState.WAITING,
                        "resuming after restart",
                        self.cfg.name,
                        report=False,
                    )


async def _discard(early: EarlyExtract | None) -> None:
    """Drop an overlapped extraction nobody took (a no-op once installed)."""
    if early is not None:
        await early.discard()


def _log_failure(job: Job) -> Callable[[asyncio.Task[None]], None]:
    """A background task's failure becomes one structured event."""

    def done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("job.progress_failed", job=job.id, package=job.package, reason=repr(exc))

    return done
