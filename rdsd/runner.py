"""Doing this node's own jobs: fetch, then store, offer or install.

The daemon and ``rdsft`` share this code and may run at the same time, so
each job is claimed with an exclusive file lock (released by the kernel if
the process dies) and its state is re-read after the lock is taken: a job is
done once, by whoever got there first.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog

from .config import NodeConfig, Role, iso
from .install import install
from .jobdb import Dest, Job, JobDB
from .manifest import Manifest, ManifestError, open_envelope
from .security import Verifier
from .store import DiskFull, Store, StoreError
from .transfer import TransferFailed, receive
from .uplink import Uplink

log = structlog.get_logger("rdsd.runner")


@contextlib.contextmanager
def job_lock(locks: Path, job: str, wait: bool = False) -> Iterator[bool]:
    """Yield True if this process now owns ``job``; False if another does."""
    locks.mkdir(parents=True, exist_ok=True)
    fd = os.open(locks / f"{job}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


class Fetcher:
    """Gets packages from the parent into the store, once per package however
    many jobs or children want it at the same moment."""

    def __init__(self, cfg: NodeConfig, store: Store, link: Uplink) -> None:
        self.cfg = cfg
        self.store = store
        self.link = link
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, manifest: Manifest, envelope: bytes) -> asyncio.Task[None]:
        task = self._tasks.get(manifest.id)
        if task is None or task.done():
            task = asyncio.create_task(self._obtain(manifest, envelope))
            self._tasks[manifest.id] = task
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
        return task

    async def get(self, manifest: Manifest, envelope: bytes) -> None:
        if self.store.has(manifest.id):
            return
        await asyncio.shield(self.start(manifest, envelope))

    async def started(self, manifest: Manifest, envelope: bytes, timeout: float = 10.0) -> bool:
        """Start fetching and return once readers can follow the download."""
        task = self.start(manifest, envelope)
        try:
            async with asyncio.timeout(timeout):
                while not (self.store.has(manifest.id) or self.store.active(manifest.id)):
                    if task.done():
                        return self.store.has(manifest.id)
                    await asyncio.sleep(0.01)
        except TimeoutError:
            return False  # our own parent is away; the child will try again
        return True

    async def _obtain(self, manifest: Manifest, envelope: bytes) -> None:
        cfg = self.cfg
        bound = log.bind(node=cfg.name, package=manifest.id)
        attempt = 0
        while not self.store.has(manifest.id):
            attempt += 1
            try:
                session = await self.link.wait_session(cfg.idle_timeout)
            except TimeoutError:
                raise TransferFailed(f"parent unreachable: {self.link.last_error}") from None
            resume = self.link.resumes
            try:
                dl = await self.store.begin_download(envelope, manifest, resume=resume)
            except DiskFull as exc:
                raise TransferFailed(str(exc), retryable=False) from None
            except StoreError as exc:
                # Another process (the daemon, or rdsft) is fetching it: wait.
                if attempt >= cfg.retry_limit * 10:
                    raise TransferFailed(str(exc)) from None
                bound.info("fetch.waiting", reason=str(exc))
                await asyncio.sleep(min(cfg.reconnect_max, 1.0))
                continue
            try:
                await receive(
                    session,
                    self.link.router,
                    dl,
                    cfg.idle_timeout,
                    cfg.name,
                    self._progress(bound),
                    cfg.progress_interval,
                )
                return
            except TransferFailed as exc:
                dl.fail(str(exc), keep_partial=resume and exc.retryable)
                bound.warning(
                    "fetch.failed",
                    attempt=attempt,
                    reason=str(exc),
                    resume_from=dl.verified if resume else 0,
                )
                if not exc.retryable or attempt >= cfg.retry_limit:
                    raise
            except BaseException:
                dl.fail("interrupted", keep_partial=resume)
                raise
            delay = min(cfg.reconnect_min * 2**attempt, cfg.reconnect_max)
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))

    @staticmethod
    def _progress(bound: Any) -> Callable[[int, int], None]:
        def report(done: int, total: int) -> None:
            bound.info(
                "fetch.progress",
                bytes=done,
                size=total,
                percent=round(100 * done / max(total, 1), 1),
            )

        return report


class Runner:
    """Runs jobs addressed to this node."""

    def __init__(
        self,
        cfg: NodeConfig,
        db: JobDB,
        store: Store,
        verifier: Verifier,
        fetcher: Fetcher,
        changed: Callable[[], None],
    ) -> None:
        self.cfg = cfg
        self.db = db
        self.store = store
        self.verifier = verifier
        self.fetcher = fetcher
        self.changed = changed
        self._running: dict[str, asyncio.Task[Dest | None]] = {}

    def kick(self) -> None:
        """Start every due job of ours that is not already running here."""
        for job, dest in self.db.open_work():
            if dest.node == self.cfg.name and dest.state == "waiting":
                self.spawn(job)

    def spawn(self, job: Job) -> asyncio.Task[Dest | None]:
        task = self._running.get(job.id)
        if task is None or task.done():
            task = asyncio.create_task(self.run(job))
            self._running[job.id] = task
        return task

    def cancel(self, jid: str) -> None:
        task = self._running.get(jid)
        if task is not None:
            task.cancel()

    async def stop(self) -> None:
        for task in self._running.values():
            task.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)

    def _set(self, job: Job, state: str, detail: str = "") -> None:
        self.db.change(
            job.id, self.cfg.name, state, detail, self.cfg.name, report=True, package=job.package
        )
        log.info(
            "job.state",
            node=self.cfg.name,
            job=job.id,
            package=job.package,
            state=state,
            detail=detail,
        )
        self.changed()

    async def run(self, job: Job, wait_lock: bool = False) -> Dest | None:
        with job_lock(self.cfg.paths.locks, job.id, wait=wait_lock) as mine:
            if not mine:
                return None
            dest = self.db.dest(job.id, self.cfg.name)
            if dest is None or dest.final:
                return dest
            try:
                await self._do(job)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("job.crashed", node=self.cfg.name, job=job.id)
                self._set(job, "failed", f"internal error: {exc!r}")
            return self.db.dest(job.id, self.cfg.name)

    async def _do(self, job: Job) -> None:
        try:
            manifest = open_envelope(job.manifest, self.verifier)
        except ManifestError as exc:
            self._set(job, "failed", str(exc))
            return
        role = self.cfg.role
        if job.type == "transfer" and role is not Role.RELAY:
            self._set(job, "failed", "transfer jobs deliver to relays only")
            return
        if job.type != "transfer" and role is not Role.CLIENT:
            self._set(job, "failed", f"{job.type} jobs deliver to clients only")
            return
        if job.type == "transfer":
            self._refresh_keep(manifest, job.manifest)
        if not self.store.has(manifest.id):
            self._set(job, "transferring")
            watcher = asyncio.create_task(self._report_progress(job, manifest))
            try:
                await self.fetcher.get(manifest, job.manifest)
            except TransferFailed as exc:
                self._set(job, "failed", str(exc))
                return
            finally:
                watcher.cancel()
        current = self.db.dest(job.id, self.cfg.name)
        if current is None or current.state == "cancelled":
            return  # cancelled while it was transferring
        if job.type == "transfer":
            self._set(job, "stored", f"kept until {iso(manifest.expires)}")
        elif job.type == "offer":
            self._set(job, "offered")
        else:
            await self.install(job, manifest)

    async def _report_progress(self, job: Job, manifest: Manifest) -> None:
        """On a long transfer, say how far it got, so status tells the truth."""
        last = -1
        while True:
            await asyncio.sleep(self.cfg.progress_interval)
            dl = self.store.active(manifest.id)
            if dl is None or dl.verified == last:
                continue
            last = dl.verified
            mib = 1024 * 1024
            pct = 100 * dl.verified // max(manifest.size, 1)
            self._set(
                job,
                "transferring",
                f"{pct}% ({dl.verified / mib:.1f} of {manifest.size / mib:.1f} MiB)",
            )

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

    async def install(self, job: Job, manifest: Manifest) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.store.verify, manifest.id)
        except StoreError as exc:
            self.store.delete(manifest.id)
            self._set(job, "failed", f"not installed: {exc}")
            return
        self._set(job, "installing")
        result = await install(
            self.store.data_path(manifest.id),
            manifest,
            self.cfg.paths.work,
            self.cfg.name,
            job.id,
            self.cfg.install_timeout,
        )
        if result.ok:
            self._set(job, "installed", result.detail)
            self.store.delete(manifest.id)
        else:
            self._set(job, "failed", result.detail)

    def recover(self) -> None:
        """After a crash: an install that was running did not finish, so say
        so; a transfer that was running simply runs again."""
        for job, dest in self.db.open_work(now=float("inf")):
            if dest.node != self.cfg.name or dest.state == "waiting":
                continue
            with job_lock(self.cfg.paths.locks, job.id) as mine:
                if not mine:  # rdsft is doing it right now
                    continue
                if dest.state == "installing":
                    self._set(job, "failed", "interrupted: the node stopped during the install")
                elif dest.state == "transferring":
                    self.db.change(
                        job.id,
                        dest.node,
                        "waiting",
                        "resuming after restart",
                        self.cfg.name,
                        report=False,
                    )
