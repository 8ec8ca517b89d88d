"""A running node, as an async context manager over an explicit config.

``ROLE_PARTS`` says which parts a role has; this module builds them, runs
their background work in one task group, and implements what the child half
asks of the node (job notices, cancels, revocations, acknowledgements) and
what the parent half asks of a relay (fetch a package on a child's behalf,
ask its own parent for a child's pending jobs). Nothing here is global, so
several nodes can run in one event loop (the tests do exactly that).

Every part reports what it does on the node's ``EventBus`` (``node.bus``);
embedders read it with ``node.events(...)``. Destination changes reach the
bus from the job database's listener, right after each commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
from collections.abc import Coroutine, Iterable
from types import TracebackType
from typing import Any

import structlog

from protocol import JobCancel, JobNotice

from ..child.fetcher import Fetcher
from ..child.gate import TransferGate
from ..child.intake import JobIntake
from ..child.uplink import Uplink
from ..config import NodeConfig
from ..domain import DestState, JobPace
from ..errors import ConfigError, IllegalTransition, ManifestError, SecurityError, SessionClosed
from ..events import Event, EventBus, Subscription, wait_for_state
from ..net.observe import TrafficObserver
from ..packages.manifest import Envelopes
from ..packages.store import Store
from ..parent.downlinks import Downlinks, ParentHooks
from ..security import Verifier, certificate_identity, client_context, server_context
from ..state import JobDB
from ..util.windows import describe_hold
from .housekeeping import Housekeeper
from .lag import LagFigures, LoopMonitor
from .roles import ROLE_PARTS
from .runner import Runner

log = structlog.get_logger("rdsd.node")

#: The settings a running node takes on a reload; the others need a restart.
RELOADABLE = (
    "download_rate",
    "upload_rate",
    "per_child_rate",
    "transfer_windows",
    "install_windows",
)


class Node:
    """``async with Node(cfg) as node:`` runs a server, relay or client.

    ``observer``, if given, hears how many bytes each session sends (for
    benchmarks and metrics). Every method is for the event loop's thread:
    the node, its database connection and its bus belong to that loop."""

    def __init__(self, cfg: NodeConfig, observer: TrafficObserver | None = None) -> None:
        self.cfg = cfg
        self.parts = ROLE_PARTS[cfg.role]
        self.observer = observer
        paths = cfg.paths
        self.envelopes = Envelopes(Verifier(paths.signing_pub.read_bytes()))
        self.bus = EventBus(name=cfg.name)
        self.db = JobDB(paths.db)
        self.db.listen(cfg.name, self.bus.publish)
        self.store = Store(paths.store, self.envelopes, refetchable=self.parts.refetchable)
        self.log = log.bind(node=cfg.name, role=cfg.role)
        self.intake = JobIntake(cfg.name, cfg.role, self.db, self.envelopes)
        self.housekeeping = Housekeeper(self)
        self.lag = LoopMonitor(cfg.name, cfg.loop_lag_period)
        self.downlinks: Downlinks | None = None
        self.uplink: Uplink | None = None
        self.runner: Runner | None = None
        self.fetcher: Fetcher | None = None
        self.gate: TransferGate | None = None
        self._group: asyncio.TaskGroup | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._acks: list[str] = []  # acknowledged, to be written together
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def address(self) -> tuple[str, int]:
        """Where children connect (the bound port when configured with 0)."""
        if self.downlinks is None:
            raise RuntimeError(f"a {self.cfg.role} does not listen")
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

    def _check_identity(self) -> None:
        """The name and role in the configuration are the ones the
        certificate proves. A node whose file says ``relay`` but holds a
        client's certificate would start, then be refused by its parent on
        every connect; saying so at start names the fix instead."""
        cert = self.cfg.paths.cert
        try:
            pem = cert.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read this node's certificate {cert}: {exc}") from None
        try:
            name, role, _ = certificate_identity(pem)
        except SecurityError as exc:
            raise ConfigError(f"{cert}: {exc}") from None
        if (name, role) != (self.cfg.name, self.cfg.role.value):
            raise ConfigError(
                f"{self.cfg.paths.config} says {self.cfg.name} ({self.cfg.role.value}) but "
                f"the certificate {cert} is for {name} ({role}); "
                "set node.name and node.role to match it, or install this node's bundle"
            )

    async def start(self) -> None:
        cfg, paths, parts = self.cfg, self.cfg.paths, self.parts
        loop = asyncio.get_running_loop()
        if loop.get_exception_handler() is None:
            # What asyncio would print raw on stderr (a task's exception
            # nobody retrieved, an SSL shutdown that timed out) becomes one
            # structured event. An embedder's own handler is left alone.
            loop.set_exception_handler(self._loop_error)
            self._loop = loop
        self._check_identity()
        self.store.prepare()
        paths.work.mkdir(exist_ok=True)
        if parts.child_half:
            ctx = client_context(paths.ca_cert, paths.cert, paths.key)
            self.uplink = Uplink(
                cfg, ctx, self, observer=self.observer, counter=self.db.next_claim_counter
            )
            self.gate = TransferGate(cfg, self._fetch_paces, self.db.package_rate)
            self.fetcher = Fetcher(
                cfg, self.store, self.uplink, self.bus, self._fetch_owners, self.gate
            )
        if parts.runs_jobs:
            assert self.fetcher is not None
            self.runner = Runner(cfg, self.db, self.store, self.envelopes, self.fetcher, self.wake)
            self.runner.recover()
        if parts.parent_half:
            hooks = ParentHooks(
                provide=self._provide,
                reports_changed=self.wake,
                topology_changed=self._topology_changed,
                presence_changed=self._presence_changed,
                forward_reports=parts.forwards_up,
                ask_parent=self._ask_parent if parts.forwards_up else None,
                held=self._held,
            )
            ctx = server_context(paths.ca_cert, paths.cert, paths.key)
            self.downlinks = Downlinks(
                cfg, self.db, self.store, self.envelopes, ctx, hooks, self.observer, self.bus
            )
            await self.downlinks.start()
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        if parts.child_half:
            self.housekeeping.sweep()
            self._spawn(self.housekeeping.sweeper(), "sweep")
        if self.uplink is not None:
            self._spawn(self.uplink.run(), "uplink")
        self._spawn(self.housekeeping.poll(), "poll")
        # Commits on the loop leave the log to the checkpointer's thread.
        self.db.defer_checkpoints()
        self._spawn(self.housekeeping.checkpointer(), "checkpoint")
        self._spawn(self.lag.run(), "loop-lag")
        if parts.parent_half:
            # What this node serves is checked at rest after each start and
            # on a schedule, so serves need not hash it.
            self._spawn(self.store.verify_stored(), "verify-at-rest")
        self.log.info("node.started")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        assert self._group is not None
        self._tasks.append(self._group.create_task(coro, name=name))

    async def stop(self) -> None:
        if self.uplink is not None:
            # Without this the link reconnects between the goodbye and the
            # cancel, and the parent sees the child come back as it leaves.
            await self.uplink.close("shutting down")
        if self.runner is not None:
            await self.runner.stop()
        if self.fetcher is not None:
            await self.fetcher.stop()
        for task in self._tasks:
            task.cancel()
        if self._group is not None:
            group, self._group = self._group, None
            await group.__aexit__(None, None, None)
        if self.downlinks is not None:
            await self.downlinks.stop()
        if self._acks:
            self._write_acks()  # acknowledged before the database closes
        self.db.close()
        # After the last thing that could publish: subscribers get what is
        # buffered, then their iteration ends.
        self.bus.close()
        if self._loop is not None:
            self._loop.set_exception_handler(None)
            self._loop = None
        self.log.info("node.stopped")

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        task = context.get("task") or context.get("future")
        self.log.warning(
            "node.background_error",
            message=context.get("message", ""),
            error=repr(exc) if exc is not None else None,
            task=task.get_name() if isinstance(task, asyncio.Task) else None,
        )

    def wake(self) -> None:
        """Something changed: run the housekeeping pass soon."""
        self.housekeeping.wake()

    def _presence_changed(self, names: Iterable[str] | None = None) -> None:
        self.housekeeping.presence_changed(names)

    def _topology_changed(self, names: Iterable[str] | None = None) -> None:
        self.housekeeping.topology_changed(names)
        self.wake()

    def _fetch_owners(self, package: str) -> list[str]:
        """This node's unfinished jobs for ``package``: whom a fetch is for."""
        me = self.cfg.name
        return [
            job.id
            for job, _ in self.db.own_work(me, float("inf"), waiting_only=False)
            if job.package == package
        ]

    def _fetch_paces(self, package: str) -> list[JobPace]:
        """The rates and windows of the jobs a fetch of ``package`` is for."""
        return [self.db.job_pace(jid) for jid in self._fetch_owners(package)]

    def reload(self, cfg: NodeConfig | None = None) -> NodeConfig:
        """Take new limits and windows without a restart (SIGHUP, ``rdsd
        reload``): from ``cfg``, or read again from ``HOME/rdsd.toml``.
        Other settings need a restart; a changed one is logged as such.
        A bad file raises ConfigError and changes nothing."""
        new = cfg if cfg is not None else NodeConfig.load(self.cfg.home)
        live = {name: getattr(new, name) for name in RELOADABLE}
        later = sorted(
            name
            for name, value in new.settings().items()
            if name not in RELOADABLE and value != getattr(self.cfg, name)
        )
        self.cfg = dataclasses.replace(self.cfg, **live)
        if self.downlinks is not None:
            self.downlinks.pacing.set_limits(new.upload_rate, new.per_child_rate)
        if self.gate is not None:
            self.gate.update(new)
        self.log.info(
            "node.reloaded",
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in live.items()},
            needs_restart=later or None,
        )
        return self.cfg

    # -- what a relay's parent half asks of the node --------------------------------

    async def _provide(self, package: str) -> bool:
        """A child wants a package we do not hold: start fetching it from our
        parent (once) so the child can follow the download."""
        if self.fetcher is None:
            return False
        envelope = next(
            (job.manifest for job in reversed(self.db.jobs()) if job.package == package), None
        )
        if envelope is None:
            return False
        try:
            manifest = self.envelopes.open_for(envelope, package)
        except ManifestError:
            return False
        if self.gate is not None:
            now = self.gate.clock()
            if self.gate.transfer_opens(package, now) > now:
                # Outside our transfer window: fetch once it opens; the child
                # hears why and asks again (it counts no failure).
                self.fetcher.start(manifest, envelope)
                return False
        return await self.fetcher.started(manifest, envelope)

    def _held(self, package: str) -> str | None:
        """Why this relay cannot provide ``package`` now, if a window holds it."""
        if self.gate is None:
            return None
        now = self.gate.clock()
        at = self.gate.transfer_opens(package, now)
        return describe_hold("transfer", at) if at > now else None

    async def _ask_parent(self, node: str) -> None:
        """Before answering a child's query, fetch its pending jobs from our
        own parent, so ``rdsft -a`` works even where no daemon has run yet.
        Best effort: if the parent is away, answer from what we have."""
        if self.uplink is None or self.uplink.session is None:
            return
        self.housekeeping.tell_parent = True
        await self.housekeeping.describe_subtree()
        try:
            await self.uplink.query_pending(self.cfg.handshake_timeout, node=node)
        except (TimeoutError, SessionClosed) as exc:
            self.log.warning("query.parent_unavailable", dest=node, reason=str(exc))

    # -- what the child half asks of the node -----------------------------------------

    async def on_connected(self, link: Uplink) -> None:
        self.housekeeping.tell_parent = True
        await self.housekeeping.describe_subtree()
        await self.housekeeping.send_presence()
        await self.housekeeping.flush_outbox()
        self.wake()

    async def on_job_notice(self, notice: JobNotice) -> None:
        accepted = self.intake.accept(notice)
        if accepted is None:
            return
        if accepted.below and self.fetcher is not None and not self.store.has(notice.package):
            self.fetcher.start(accepted.manifest, notice.manifest)
        self.wake()

    async def on_job_cancel(self, cancel: JobCancel) -> None:
        for node in cancel.destinations:
            dest = self.db.dest(cancel.job, node)
            if dest is None or dest.final:
                continue
            with contextlib.suppress(IllegalTransition):
                self.db.change(
                    cancel.job,
                    node,
                    DestState.CANCELLED,
                    "cancelled upstream",
                    self.cfg.name,
                    report=False,
                )
            self.log.info("job.cancelled", job=cancel.job, dest=node)
            if node == self.cfg.name and self.runner is not None:
                self.runner.cancel(cancel.job)
        self.wake()

    async def on_revoked(self, nodes: list[str]) -> None:
        self.db.set_revoked(nodes)
        self.housekeeping.revocations_changed = True
        self.housekeeping.topology_changed(None)  # revoked nodes leave the subtree
        self.wake()

    def on_report_ack(self, report_id: str) -> None:
        """Acknowledgements that arrive in one turn of the event loop are
        written together: one transaction, not one fsync per report."""
        if report_id.startswith("job:"):
            self.db.mark_announced(report_id[4:])
            return
        self._acks.append(report_id)
        if len(self._acks) == 1:
            asyncio.get_running_loop().call_soon(self._write_acks)

    def _write_acks(self) -> None:
        acks, self._acks = self._acks, []
        if not acks:
            return
        try:
            self.db.ack_many(acks)
        except sqlite3.Error as exc:
            # Not forgotten: they go up again and are acknowledged again.
            self.log.warning("outbox.ack_not_recorded", reports=len(acks), reason=str(exc))

    # -- for embedders ------------------------------------------------------------------

    @property
    def loop_lag(self) -> LagFigures | None:
        """How late this node's event loop ran over the last complete period
        (``[log] lag_period``; ``None`` until one has ended): p50, p99 and
        worst in seconds, measured from inside by a task that sleeps 100 ms
        and times its wake-up. ``node.lag.current()`` gives the period in
        progress."""
        return self.lag.last

    def events(
        self,
        *,
        job: str | Iterable[str] | None = None,
        node: str | Iterable[str] | None = None,
        types: type[Event] | Iterable[type[Event]] | None = None,
        maxsize: int = 1000,
    ) -> Subscription:
        """Subscribe to what this node does from now on (see ``EventBus.subscribe``
        for the filters and ``rdsd.events`` for the slow-consumer policy)::

            async with node.events(job=jid, types=DestChanged) as sub:
                async for event in sub: ...

        Iteration ends when the node stops, after the events already buffered."""
        return self.bus.subscribe(job=job, node=node, types=types, maxsize=maxsize)

    async def wait_for(
        self,
        job: str,
        node: str,
        states: DestState | Iterable[DestState | str],
        timeout: float | None,
    ) -> DestState:
        """Wait until ``node``'s state for ``job`` is one of ``states``, as
        this node's database records it, and return that state. Woken by the
        change itself (no polling). Changes another process (the ``rdsd``
        command line) writes are not events here; wait on the node whose
        daemon makes the change, or attach the ``AsyncAdmin`` to this node.
        Raises TimeoutError after ``timeout`` seconds and ``EventBusClosed``
        if the node stops first."""
        wanted = [DestState(states)] if isinstance(states, str) else [DestState(s) for s in states]

        def current() -> DestState | None:
            try:
                dest = self.db.dest(job, node)
            except sqlite3.ProgrammingError:
                return None  # the node stopped and closed its database
            return None if dest is None else dest.state

        return await wait_for_state(self.bus, job, node, wanted, current, timeout)
