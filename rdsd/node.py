"""A running node, as an async context manager over an explicit config.

The role decides which halves it is built from: the managing server is a
parent half over the storehouse and job database; a client is a child half
with a runner; a relay is both halves over its cache, forwarding what it
learns from below to its parent. Nothing here is global, so several nodes
can run in one event loop (the tests do exactly that).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from types import TracebackType

import structlog

from protocol import Holdings, JobAnnounce, JobCancel, JobNotice, Topology

from .config import NodeConfig, Role
from .downlinks import Downlinks, ParentHooks
from .jobdb import JobDB
from .manifest import ManifestError, open_envelope
from .runner import Fetcher, Runner
from .security import Verifier, client_context, server_context
from .session import SessionClosed
from .store import Store
from .uplink import Uplink

log = structlog.get_logger("rdsd.node")


class Node:
    """``async with Node(cfg) as node:`` runs a server, relay or client."""

    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        paths = cfg.paths
        self.verifier = Verifier(paths.signing_pub.read_bytes())
        self.db = JobDB(paths.db)
        self.store = Store(paths.store, self.verifier, refetchable=cfg.role is not Role.SERVER)
        self.downlinks: Downlinks | None = None
        self.uplink: Uplink | None = None
        self.runner: Runner | None = None
        self.fetcher: Fetcher | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._version = -1
        self._due: float | None = None
        self._tell_parent = False
        self._held: dict[str, float] = {}
        self.log = log.bind(node=cfg.name, role=cfg.role.value)

    @property
    def address(self) -> tuple[str, int]:
        """Where children connect (the bound port when configured with 0)."""
        if self.downlinks is None:
            raise RuntimeError(f"a {self.cfg.role.value} does not listen")
        return self.downlinks.address

    async def __aenter__(self) -> Node:
        try:
            await self.start()
        except BaseException:
            # e.g. the listen address is taken: release what was opened.
            await self.stop()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        cfg, paths = self.cfg, self.cfg.paths
        self.store.prepare()
        paths.work.mkdir(exist_ok=True)
        if cfg.role is not Role.SERVER:
            ctx = client_context(paths.ca_cert, paths.cert, paths.key)
            self.uplink = Uplink(cfg, ctx, self)
            self.fetcher = Fetcher(cfg, self.store, self.uplink)
            self.runner = Runner(cfg, self.db, self.store, self.verifier, self.fetcher, self.wake)
            self.runner.recover()
        if cfg.role is not Role.CLIENT:
            hooks = ParentHooks(
                provide=self._provide,
                reports_changed=self.wake,
                topology_changed=self._topology_changed,
                forward_reports=cfg.role is Role.RELAY,
                ask_parent=self._ask_parent if cfg.role is Role.RELAY else None,
            )
            ctx = server_context(paths.ca_cert, paths.cert, paths.key)
            self.downlinks = Downlinks(cfg, self.db, self.store, ctx, hooks)
            await self.downlinks.start()
        if cfg.role is not Role.SERVER:
            self.sweep()
            self._tasks.append(asyncio.create_task(self._sweeper(), name="sweep"))
        if self.uplink is not None:
            self._tasks.append(asyncio.create_task(self.uplink.run(), name="uplink"))
        self._tasks.append(asyncio.create_task(self._poll(), name="poll"))
        self.log.info("node.started")

    async def stop(self) -> None:
        if self.uplink is not None and self.uplink.session is not None:
            await self.uplink.session.goodbye("shutting down")
        if self.runner is not None:
            await self.runner.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.downlinks is not None:
            await self.downlinks.stop()
        self.db.close()
        self.log.info("node.stopped")

    def wake(self) -> None:
        """Something changed: run the housekeeping pass soon."""
        self._wake.set()

    def _topology_changed(self) -> None:
        self._tell_parent = True
        self.wake()

    async def _poll(self) -> None:
        """Admin commands write the database from another process; notice
        that (and due execution times) within ``poll_interval``. Idle polls
        cost one PRAGMA; the full pass runs only when something changed."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.cfg.poll_interval):
                    await self._wake.wait()
            # Read the flag itself: a wake() in the same step as the timeout
            # must not be lost.
            woken = self._wake.is_set()
            self._wake.clear()
            try:
                await self._tick(woken)
            except Exception:
                self.log.exception("node.tick_failed")

    async def _tick(self, woken: bool = True) -> None:
        version = self.db.data_version()
        now = time.time()
        due = self._due is not None and self._due <= now
        if not (woken or due or version != self._version):
            return
        self._version = version
        self._due = self.db.next_due(now)
        if self.downlinks is not None:
            await self.downlinks.dispatch()
        if self.uplink is not None:
            if self._tell_parent or (self.cfg.role is Role.RELAY and self.holdings() != self._held):
                await self._describe_subtree()
            await self.flush_outbox()
        if self.runner is not None:
            self.runner.kick()

    def _expire_offers(self, package: str) -> None:
        """An offer whose package expired can no longer be chosen: say so."""
        me = self.cfg.name
        for job in self.db.jobs():
            dest = self.db.dest(job.id, me) if job.package == package else None
            if dest is not None and dest.state == "offered":
                self.db.change(
                    job.id,
                    me,
                    "failed",
                    "the offer expired before it was installed",
                    me,
                    report=True,
                    package=package,
                )

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.sweep_interval)
            try:
                self.sweep()
            except Exception:
                self.log.exception("node.sweep_failed")

    def sweep(self, now: float | None = None) -> list[str]:
        """Delete packages whose keep time is over, except one being served
        or downloaded right now (it goes on a later sweep). The parent learns
        it from the next HOLDINGS."""
        now = time.time() if now is None else now
        gone = []
        for m in self.store.manifests():
            if m.expires <= now and not self.store.in_use(m.id):
                self.store.delete(m.id)
                gone.append(m.id)
                self.log.info("package.expired", package=m.id)
                self._expire_offers(m.id)
        if gone:
            self.wake()
        return gone

    async def flush_outbox(self) -> None:
        """Announce jobs made here, then send queued reports: the parent must
        know a job before it hears how it went."""
        if self.uplink is None:
            return
        if self.cfg.role is Role.RELAY:
            await self.uplink.send_up(
                [
                    (
                        f"job:{job.id}",
                        JobAnnounce(
                            job=job.id,
                            type=job.type,
                            package=job.package,
                            destinations=[d.node for d in self.db.dests(job.id)],
                            origin=job.origin,
                            at=job.at,
                            manifest=job.manifest,
                        ),
                    )
                    for job in self.db.unannounced()
                ]
            )
        await self.uplink.send_reports(self.db.outbox())

    # -- the relay's parent-half hook -------------------------------------------

    async def _provide(self, package: str) -> bool:
        """A child wants a package we do not hold: start fetching it from our
        parent (once) so the child can follow the download."""
        if self.fetcher is None:
            return False
        for job in reversed(self.db.jobs()):
            if job.package == package:
                try:
                    manifest = open_envelope(job.manifest, self.verifier)
                except ManifestError:
                    return False
                return await self.fetcher.started(manifest, job.manifest)
        return False

    async def _ask_parent(self, node: str) -> None:
        """Before answering a child's query, fetch its pending jobs from our
        own parent, so ``rdsft -a`` works even where no daemon has run yet.
        Best effort: if the parent is away, answer from what we have."""
        if self.uplink is None or self.uplink.session is None:
            return
        self._tell_parent = True
        await self._describe_subtree()
        try:
            await self.uplink.query_pending(self.cfg.handshake_timeout, node=node)
        except (TimeoutError, SessionClosed) as exc:
            self.log.warning("query.parent_unavailable", dest=node, reason=str(exc))

    # -- the child half's handler ------------------------------------------------

    async def on_connected(self, link: Uplink) -> None:
        self._tell_parent = True
        await self._describe_subtree()
        await self.flush_outbox()
        self.wake()

    async def _describe_subtree(self) -> None:
        """A relay tells its parent which nodes are behind it (so jobs for
        them are routed here) and what its cache holds."""
        session = self.uplink.session if self.uplink else None
        if self.cfg.role is not Role.RELAY or session is None or session.closed:
            return
        self._tell_parent = False
        nodes = {
            n.name: n.role
            for n in self.db.nodes()
            if n.name != self.cfg.name and n.via and not n.revoked
        }
        self._held = self.holdings()
        try:
            await session.send(Topology(nodes=nodes))
            await session.send(Holdings(packages=self._held))
        except SessionClosed:
            self._tell_parent = True

    def holdings(self) -> dict[str, float]:
        return {m.id: m.expires for m in self.store.manifests()}

    async def on_job_notice(self, notice: JobNotice) -> None:
        try:
            manifest = open_envelope(notice.manifest, self.verifier)
        except ManifestError as exc:
            self.log.error("job.rejected", job=notice.job, package=notice.package, reason=str(exc))
            return
        if manifest.id != notice.package:
            self.log.error(
                "job.rejected",
                job=notice.job,
                package=notice.package,
                reason=f"manifest is for {manifest.id}",
            )
            return
        mine = [d for d in notice.destinations if d == self.cfg.name]
        below = [d for d in notice.destinations if d != self.cfg.name]
        if below and self.cfg.role is not Role.RELAY:
            self.log.warning("job.misrouted", job=notice.job, dests=below)
            below = []
        self.db.receive_job(
            notice.job,
            notice.type,
            notice.package,
            mine + below,
            notice.manifest,
            notice.at,
            notice.origin or "",
            notice.generation,
        )
        self.log.info(
            "job.received",
            job=notice.job,
            package=notice.package,
            type=notice.type,
            dests=notice.destinations,
        )
        if below and self.fetcher is not None and not self.store.has(manifest.id):
            self.fetcher.start(manifest, notice.manifest)
        self.wake()

    async def on_job_cancel(self, cancel: JobCancel) -> None:
        for node in cancel.destinations:
            dest = self.db.dest(cancel.job, node)
            if dest is None or dest.final:
                continue
            self.db.change(
                cancel.job, node, "cancelled", "cancelled upstream", self.cfg.name, report=False
            )
            self.log.info("job.cancelled", job=cancel.job, dest=node)
            if node == self.cfg.name and self.runner is not None:
                self.runner.cancel(cancel.job)
        self.wake()

    async def on_revoked(self, nodes: list[str]) -> None:
        self.db.set_revoked(nodes)
        self.wake()

    def on_report_ack(self, report_id: str) -> None:
        if report_id.startswith("job:"):
            self.db.mark_announced(report_id[4:])
        else:
            self.db.ack(report_id)

    # -- for embedders and rdsft ---------------------------------------------------

    async def wait_for(self, job: str, node: str, states: set[str], timeout: float) -> str:
        """Wait until ``node``'s state for ``job`` is one of ``states``."""
        async with asyncio.timeout(timeout):
            while True:
                dest = self.db.dest(job, node)
                if dest is not None and dest.state in states:
                    return dest.state
                await asyncio.sleep(0.05)


__all__ = ["Node", "SessionClosed"]
