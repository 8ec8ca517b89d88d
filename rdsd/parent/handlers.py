"""What the parent half does with each message from a child, as a table.

``ChildHandlers.TABLE`` maps each message type a child may send to one
method; a type missing from it (PONG) is accepted and ignored. A handler
raises ``ProtocolError`` for something this child may not do, which closes
its session with the reason; everything else it answers on the child's own
session.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import structlog

from protocol import (
    ErrorCode,
    Fetch,
    FetchCancel,
    FetchFail,
    Holdings,
    JobAnnounce,
    Message,
    MessageType,
    PendingDone,
    PendingQuery,
    Ping,
    Pong,
    Presence,
    ProtocolError,
    Report,
    ReportAck,
    Topology,
)

from ..domain import IncomingJob, JobType, Role
from ..errors import ManifestError, SessionClosed
from ..net.transfer import serve_fetch
from .routing import judge_topology

if TYPE_CHECKING:
    from .downlinks import Child, Downlinks

log = structlog.get_logger("rdsd.downlinks")
Handler = Callable[["ChildHandlers", "Child", Message], Awaitable[None]]


def _relay_only(child: Child, what: str) -> None:
    if child.role is not Role.RELAY:
        raise ProtocolError(f"only a relay {what}", ErrorCode.UNAUTHORIZED)


class ChildHandlers:
    def __init__(self, parent: Downlinks) -> None:
        self.parent = parent
        self.log = parent.log

    async def handle(self, child: Child, msg: Message) -> None:
        handler = self.TABLE.get(msg.TYPE)
        if handler is None:
            return
        try:
            await handler(self, child, msg)
        except sqlite3.Error as exc:
            # Our database cannot take it now (a full disk): the child's
            # session goes on; what it sent is not acknowledged and comes again.
            self.log.warning(
                "child.not_recorded", peer=child.name, message=msg.TYPE.name, reason=str(exc)
            )

    # -- reports ------------------------------------------------------------------

    async def on_report(self, child: Child, msg: Message) -> None:
        assert isinstance(msg, Report)
        p, session = self.parent, child.session
        if child.role is Role.CLIENT and msg.node != child.name:
            raise ProtocolError(
                f"{child.name} may not report for {msg.node}", ErrorCode.UNAUTHORIZED
            )
        ack = ReportAck(report_id=msg.report_id)
        if not p.in_subtree(child.name, msg.node) or msg.report_id != (
            f"{msg.origin or msg.node}:{msg.seq}"
        ):
            # Acknowledged and dropped: a node that moved to another relay
            # must not make its old relay's link fail over and over.
            self.log.warning(
                "report.refused",
                job=msg.job,
                dest=msg.node,
                peer=child.name,
                reason="not from this child's subtree or malformed id",
            )
            session.send_nowait(ack)
            return
        row = p.db.node(msg.node)
        if row is not None and row.revoked:
            self.log.warning("report.refused", job=msg.job, dest=msg.node, reason="revoked")
            session.send_nowait(ack)
            return
        if p.db.job_head(msg.job) is None:
            # Not acknowledged: the child keeps it and sends it again on its
            # next session, by when the job's announcement has arrived.
            self.log.warning("report.unknown_job", job=msg.job, dest=msg.node)
            return
        p.queue_report(child, msg)

    async def on_announce(self, child: Child, msg: Message) -> None:
        """Record a job made at a relay so its status is known here too."""
        assert isinstance(msg, JobAnnounce)
        p = self.parent
        if child.role is not Role.RELAY or msg.type == JobType.TRANSFER:
            raise ProtocolError(
                f"{child.name} may not announce a {msg.type} job", ErrorCode.UNAUTHORIZED
            )
        ack = ReportAck(report_id=f"job:{msg.job}")
        inside = [d for d in msg.destinations if p.in_subtree(child.name, d)]
        refusal = None
        try:
            job_type = JobType(msg.type)
            p.envelopes.open_for(msg.manifest, msg.package)
        except (ManifestError, ValueError) as exc:
            refusal = str(exc)
        known = p.db.job(msg.job)
        if (
            refusal is None
            and known is not None
            and (
                known.origin,
                known.type,
                known.package,
                known.manifest,
            )
            != (msg.origin, msg.type, msg.package, msg.manifest)
        ):
            refusal = "a different job already has this id"
        elif refusal is None and (not inside or not p.in_subtree(child.name, msg.origin)):
            refusal = "no destination is behind the announcing relay"
        if refusal is not None:
            # Acknowledged so the relay stops sending it, but not recorded:
            # one bad announcement must not cut the relay's whole subtree off.
            self.log.warning("job.announce_refused", job=msg.job, peer=child.name, reason=refusal)
            child.session.send_nowait(ack)
            return
        p.db.receive_job(
            IncomingJob(
                id=msg.job,
                type=job_type,
                package=msg.package,
                destinations=inside,
                envelope=msg.manifest,
                at=msg.at,
                origin=msg.origin,
            ),
            announced=False,
        )
        self.log.info(
            "job.announced",
            job=msg.job,
            package=msg.package,
            origin=msg.origin,
            dests=msg.destinations,
        )
        child.session.send_nowait(ack)
        p.hooks.reports_changed()

    # -- what is below a relay -------------------------------------------------------

    async def on_topology(self, child: Child, msg: Message) -> None:
        assert isinstance(msg, Topology)
        _relay_only(child, "has nodes below it")
        p = self.parent
        # Only the names in the message are looked up: a relay sends its
        # subtree once per session and then only what changed.
        known = p.db.node_index_of(msg.nodes)
        plan = judge_topology(p.cfg.name, child.name, msg.nodes, known, p.children.keys())
        for name, current in plan.refused:
            self.log.warning("topology.claim_refused", node=name, peer=child.name, current=current)
        p.db.route_through(
            child.name, plan.moves, keep=plan.keep if msg.reset else None, removed=msg.removed
        )
        moved = [name for name, _ in plan.moves]
        # After a reset, routes that were dropped are not known by name.
        p.hooks.topology_changed(None if msg.reset else [*moved, *msg.removed])
        p.push_nodes(child, moved)

    async def on_holdings(self, child: Child, msg: Message) -> None:
        assert isinstance(msg, Holdings)
        _relay_only(child, "holds packages for others")
        self.parent.db.set_holdings(child.name, msg.packages)

    async def on_presence(self, child: Child, msg: Message) -> None:
        """Who is connected below a relay now. Only nodes of its subtree
        count; the relay's own session is known here already."""
        assert isinstance(msg, Presence)
        _relay_only(child, "has nodes below it")
        p = self.parent
        # Only the names in the message are looked up, as for TOPOLOGY.
        known = p.db.node_index_of(msg.online)
        accepted = {
            name: (parent, msg.software.get(name, ""))
            for name, parent in msg.online.items()
            if name != child.name and name in known and known[name][1] == child.name
        }
        refused = len(msg.online) - len(accepted)
        if refused:
            self.log.warning(
                "presence.claim_refused",
                peer=child.name,
                count=refused,
                reason="not in this relay's subtree",
            )
        offline = [n for n in msg.offline if n != child.name]
        if msg.reset:
            was = p.db.online_through(child.name)
            offline += [n for n in was if n != child.name and n not in accepted]
        gone = p.db.presence_offline(child.name, offline)
        p.db.presence_online(child.name, accepted)
        self.log.info(
            "presence.changed",
            peer=child.name,
            online=len(accepted),
            offline=len(gone),
            reset=msg.reset,
        )
        p.hooks.presence_changed()

    async def on_pending_query(self, child: Child, msg: Message) -> None:
        assert isinstance(msg, PendingQuery)
        p = self.parent
        target = msg.node or child.name
        if not p.in_subtree(child.name, target):
            raise ProtocolError(
                f"{child.name} may not ask for {target}'s jobs", ErrorCode.UNAUTHORIZED
            )
        ask_parent = p.hooks.ask_parent

        async def answer() -> None:
            # A relay asks its own parent first, which may take a while: in a
            # task of its own, so the child's other messages go on meanwhile.
            if ask_parent is not None:
                await ask_parent(target)
            with contextlib.suppress(SessionClosed):
                jobs = p.answer_query(child, target)
                child.session.send_nowait(PendingDone(jobs=jobs, node=msg.node))

        child.spawn(answer())

    # -- fetches ----------------------------------------------------------------------

    async def on_fetch(self, child: Child, msg: Message) -> None:
        """Serve a fetch in a task of its own (a relay may first have to start
        fetching the package from its parent), so the child's reader goes on."""
        assert isinstance(msg, Fetch)
        p, session, fetch = self.parent, child.session, msg

        async def run() -> None:
            with contextlib.suppress(SessionClosed):
                if not p.db.may_fetch(fetch.package, child.name):
                    reason = f"no job gives {child.name} {fetch.package}"
                    session.send_nowait(FetchFail(fetch_id=fetch.fetch_id, reason=reason))
                    return
                held = p.store.has(fetch.package) or p.store.active(fetch.package) is not None
                if not held and not await p.hooks.provide(fetch.package):
                    reason = f"{fetch.package} is not available here"
                    session.send_nowait(FetchFail(fetch_id=fetch.fetch_id, reason=reason))
                    return
                # A bounded number of serves at once, per session and in all:
                # each holds a chunk or two and a transport buffer. A child
                # that opens many fetches and reads none holds no more than
                # its own few, and a relay with a thousand children fetching
                # together does not hold a thousand.
                async with child.fetch_slots, p.serve_slots:
                    await serve_fetch(session, p.store, fetch, p.cfg.name, p.observer)

        def done(task: asyncio.Task[None]) -> None:
            child.serving.pop(fetch.fetch_id, None)
            # Cancelled before it ever ran, or crashed: tell the child it is over.
            failed = task.cancelled() or task.exception() is not None
            if not task.cancelled() and task.exception() is not None:
                self.log.error(
                    "serve.crashed", peer=child.name, package=fetch.package,
                    error=repr(task.exception()),
                )  # fmt: skip
            if failed and fetch.fetch_id in session.conn.open_fetches:
                with contextlib.suppress(SessionClosed):
                    session.send_nowait(FetchFail(fetch_id=fetch.fetch_id, reason="cancelled"))

        task = asyncio.create_task(run())
        task.add_done_callback(done)
        child.serving[fetch.fetch_id] = task

    async def on_fetch_cancel(self, child: Child, msg: Message) -> None:
        assert isinstance(msg, FetchCancel)
        task = child.serving.get(msg.fetch_id)
        if task is not None:
            task.cancel()

    async def on_ping(self, child: Child, msg: Message) -> None:
        assert isinstance(msg, Ping)
        child.session.send_nowait(Pong(nonce=msg.nonce))

    TABLE: dict[MessageType, Handler] = {
        MessageType.REPORT: on_report,
        MessageType.JOB_ANNOUNCE: on_announce,
        MessageType.TOPOLOGY: on_topology,
        MessageType.HOLDINGS: on_holdings,
        MessageType.PRESENCE: on_presence,
        MessageType.PENDING_QUERY: on_pending_query,
        MessageType.FETCH: on_fetch,
        MessageType.FETCH_CANCEL: on_fetch_cancel,
        MessageType.PING: on_ping,
    }
