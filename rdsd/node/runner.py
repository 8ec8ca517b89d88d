"""Doing this node's own jobs: fetch, then store, offer or install.

The daemon and ``rdsft`` share this code and may run at the same time, so
each job is claimed with an exclusive file lock (released by the kernel if
the process dies) and its state is re-read after the lock is taken: a job is
done once, by whoever got there first.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog

from ..child.fetcher import Fetcher
from ..config import NodeConfig, iso
from ..domain import Dest, DestState, Job, JobType, Role, progress_detail
from ..errors import IllegalTransition, ManifestError, RdsdError, StoreError, TransferFailed
from ..packages.download import in_thread
from ..packages.manifest import Envelopes, Manifest
from ..packages.store import Store
from ..state import JobDB
from ..util.fsutil import file_lock
from .install import install

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

    def kick(self) -> None:
        """Start every due job of ours that is not already running here."""
        for job, _ in self.db.own_work(self.cfg.name, time.time(), waiting_only=True):
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

    async def run(self, job: Job, wait_lock: bool = False) -> Dest | None:
        with job_lock(self.cfg.paths.locks, job.id, wait=wait_lock) as mine:
            if not mine:
                return None
            dest = self.db.dest(job.id, self.cfg.name)
            if dest is None or dest.final:
                return dest
            try:
                await self._do(job)
            except Superseded:
                pass
            except Exception as exc:
                log.exception("job.crashed", node=self.cfg.name, job=job.id)
                with contextlib.suppress(Superseded):
                    self._set(job, DestState.FAILED, f"internal error: {exc!r}")
            return self.db.dest(job.id, self.cfg.name)

    async def _do(self, job: Job) -> None:
        try:
            manifest = self.envelopes.open(job.manifest)
        except ManifestError as exc:
            self._set(job, DestState.FAILED, str(exc))
            return
        role = self.cfg.role
        if job.type is JobType.TRANSFER and role is not Role.RELAY:
            self._set(job, DestState.FAILED, "transfer jobs deliver to relays only")
            return
        if job.type is not JobType.TRANSFER and role is not Role.CLIENT:
            self._set(job, DestState.FAILED, f"{job.type} jobs deliver to clients only")
            return
        if job.type is JobType.TRANSFER:
            self._refresh_keep(manifest, job.manifest)
        if not self.store.has(manifest.id):
            self._set(job, DestState.TRANSFERRING)
            watcher = asyncio.create_task(self._report_progress(job, manifest))
            try:
                await self.fetcher.get(manifest, job.manifest)
            except TransferFailed as exc:
                self._set(job, DestState.FAILED, str(exc))
                return
            finally:
                watcher.cancel()
        current = self.db.dest(job.id, self.cfg.name)
        if current is None or current.state is DestState.CANCELLED:
            return  # cancelled while it was transferring
        if job.type is JobType.TRANSFER:
            self._set(job, DestState.STORED, f"kept until {iso(manifest.expires)}")
        elif job.type is JobType.OFFER:
            self._set(job, DestState.OFFERED)
        else:
            await self.install(job, manifest)

    async def _report_progress(self, job: Job, manifest: Manifest) -> None:
        """On a long transfer, say how far it got, so status tells the truth:
        a human part and the ``[bytes DONE/TOTAL]`` suffix documented in
        protocol/SPEC.md (REPORT), from which every node above computes the
        rate and the end."""
        last = -1
        while True:
            await asyncio.sleep(self.cfg.progress_interval)
            dl = self.store.active(manifest.id)
            if dl is None or dl.verified == last:
                continue
            last = dl.verified
            with contextlib.suppress(Superseded):
                self._set(
                    job, DestState.TRANSFERRING, progress_detail(dl.verified, manifest.size)
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
            await in_thread(self.store.verify, manifest.id)
        except StoreError as exc:
            self.store.delete(manifest.id)
            self._set(job, DestState.FAILED, f"not installed: {exc}")
            return
        self._set(job, DestState.INSTALLING)
        result = await install(
            self.store.data_path(manifest.id),
            manifest,
            self.cfg.paths.work,
            self.cfg.name,
            job.id,
            self.cfg.install_timeout,
        )
        if result.ok:
            self._set(job, DestState.INSTALLED, result.detail)
            self.store.delete(manifest.id)
        else:
            self._set(job, DestState.FAILED, result.detail)

    def recover(self) -> None:
        """After a crash: an install that was running did not finish, so say
        so; a transfer that was running simply runs again."""
        for job, dest in self.db.own_work(self.cfg.name, float("inf"), waiting_only=False):
            if dest.state is DestState.WAITING:
                continue
            with job_lock(self.cfg.paths.locks, job.id) as mine:
                if not mine:  # rdsft is doing it right now
                    continue
                if dest.state is DestState.INSTALLING:
                    self._set(
                        job, DestState.FAILED, "interrupted: the node stopped during the install"
                    )
                elif dest.state is DestState.TRANSFERRING:
                    self.db.change(
                        job.id,
                        dest.node,
                        DestState.WAITING,
                        "resuming after restart",
                        self.cfg.name,
                        report=False,
                    )
