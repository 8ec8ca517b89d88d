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
import math
import sqlite3
import time
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

from ..claims import Attach, ClaimError, decode_attach, verify_attach, verify_report
from ..domain import DestState, IncomingJob, JobPace, JobType, Role
from ..errors import ManifestError, SessionClosed
from ..net.transfer import serve_fetch
from ..util.windows import pace_from_wire
from ..validate import (
    Invalid,
    check_expiry,
    check_seq,
    check_state,
    check_time,
    clean_text,
)
from .routing import judge_topology

if TYPE_CHECKING:
    from .downlinks import Child, Downlinks

log = structlog.get_logger("rdsd.downlinks")
Handler = Callable[["ChildHandlers", "Child", Message], Awaitable[None]]

#: Refusals of what a child sent are logged at most this many times per
#: child per window; the rest are counted and the count goes with the next.
REFUSALS_PER_WINDOW = 5
REFUSAL_WINDOW = 10.0
#: Names a refusal line lists before it says how many more.
_NAMED = 5


class Refusals:
    """Rate limit for refusal lines, per child: a hostile or broken peer
    sending thousands of bad claims or reports must not flood the log."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[float, int, int]] = {}

    def admit(self, peer: str, now: float) -> int | None:
        """None to stay silent, else how many refusals went unlogged before."""
        start, lines, held = self._seen.get(peer, (-float("inf"), 0, 0))
        if now - start >= REFUSAL_WINDOW:
            start, lines = now, 0
        if lines >= REFUSALS_PER_WINDOW:
            self._seen[peer] = (start, lines, held + 1)
            return None
        if len(self._seen) > 4096:
            self._seen.clear()
        self._seen[peer] = (start, lines + 1, 0)
        return held


def _relay_only(child: Child, what: str) -> None:
    if child.role is not Role.RELAY:
        raise ProtocolError(f"only a relay {what}", ErrorCode.UNAUTHORIZED)


def asked_rate(rate: float) -> float:
    """FETCH's rate as a limit: a child's nonsense (negative, not finite)
    asks for nothing."""
    return float(rate) if math.isfinite(rate) and rate > 0 else 0.0


class ChildHandlers:
    def __init__(self, parent: Downlinks) -> None:
        self.parent = parent
        self.log = parent.log
        self.refusals = Refusals()

    def refused(self, event: str, child: Child, reason: str, **fields: object) -> None:
        """Log that something ``child`` sent was refused, rate-limited per
        child; the reason is cleaned of control characters and bounded."""
        held = self.refusals.admit(child.name, time.monotonic())
        if held is not None:
            self.log.warning(
                event, peer=child.name, reason=clean_text(reason, 300), unlogged_before=held,
                **fields,
            )  # fmt: skip

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
        """A destination's state, as its origin signed it. Every field is
        checked before anything is stored or logged; a report that fails is
        acknowledged and dropped (the child must not send it for ever) and
        the refusal logged, rate-limited."""
        assert isinstance(msg, Report)
        p, session = self.parent, child.session
        if child.role is Role.CLIENT and msg.node != child.name:
            raise ProtocolError(
                f"{child.name} may not report for {msg.node}", ErrorCode.UNAUTHORIZED
            )
        try:
            ready = self._check_report(child, msg)
        except Invalid as exc:
            self.refused("report.refused", child, str(exc), job=msg.job, dest=msg.node)
            session.send_nowait(ReportAck(report_id=msg.report_id))
            return
        if not ready:
            # Not acknowledged: the child keeps it and sends it again on its
            # next session, by when the job's announcement has arrived.
            self.log.warning("report.unknown_job", job=msg.job, dest=msg.node, peer=child.name)
            return
        p.queue_report(child, msg)

    def _check_report(self, child: Child, rep: Report) -> bool:
        """Raise Invalid unless ``rep`` may be applied: sane fields, an
        origin that is ``child`` or proven below it, the origin's signature
        (on the server, against the key of the certificate it issued; on a
        relay, for the child's own reports, against its certificate), the
        job's package, and who may report what. False: the job is not
        known here yet."""
        p = self.parent
        origin = rep.origin or rep.node
        check_time(rep.time, time.time(), "report time")
        check_seq(rep.seq, "report seq")
        state = check_state(rep.state)
        if rep.report_id != f"{origin}:{rep.seq}":
            raise Invalid("report id is not ORIGIN:SEQ")
        if not rep.sig:
            raise Invalid("report is not signed (refused since protocol version 3)")
        if not p.in_subtree(child.name, origin):
            raise Invalid(f"origin {origin} is not {child.name} or proven below it")
        if origin != rep.node and not p.in_subtree(child.name, rep.node):
            raise Invalid(f"destination {rep.node} is not {child.name} or proven below it")
        known = p.db.claim_index({origin, rep.node})
        dest = known.get(rep.node)
        if dest is not None and dest.revoked:
            raise Invalid(f"{rep.node} is revoked")
        try:
            if origin == child.name:
                verify_report(rep, p.keys.get(child.session.peer.key))
            elif p.cfg.role is Role.SERVER:
                row = known.get(origin)
                if row is None or row.pubkey is None:
                    raise Invalid(f"origin {origin} was never enrolled here")
                verify_report(rep, p.keys.get(row.pubkey))
        except ClaimError as exc:
            raise Invalid(str(exc)) from None
        head = p.db.job_head(rep.job)
        if head is None:
            return False
        if rep.package != head.package:
            raise Invalid(f"package {rep.package} is not the job's package {head.package}")
        if origin != rep.node and (origin != head.origin or state is not DestState.CANCELLED):
            raise Invalid(
                f"{origin} may only report its own state, or cancel a job it made, "
                f"not {state} for {rep.node}"
            )
        return True

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
        pace = JobPace()
        try:
            job_type = JobType(msg.type)
            p.envelopes.open_for(msg.manifest, msg.package)
            if msg.at is not None:
                check_expiry(msg.at, time.time(), "execution time")
            pace = pace_from_wire(msg.rate, msg.windows)
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
                pace=pace,
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
        """The nodes a relay leads to, each as its own attach claim. The
        server believes a route only on a claim signed with the key of the
        certificate it issued to that node, never creates a node from one,
        and follows the chain of claims up to the relay (``judge_topology``);
        a relay, which holds no keys of nodes further down, checks the
        claims' shape, freshness and chain and leaves their signatures to
        the server."""
        assert isinstance(msg, Topology)
        _relay_only(child, "has nodes below it")
        p = self.parent
        server = p.cfg.role is Role.SERVER
        now = time.time()
        refused: list[tuple[str, str]] = []
        decoded: dict[str, Attach] = {}
        for name, raw in msg.nodes.items():
            try:
                claim = decode_attach(raw)
                if claim.node != name:
                    raise ClaimError(f"the claim is {claim.node}'s")
                check_time(claim.time, now, "attach claim time")
            except (ClaimError, Invalid) as exc:
                refused.append((name, str(exc)))
                continue
            decoded[name] = claim
        # Only the names in the message (and the parents they name) are
        # looked up: a relay sends its subtree once per session, then changes.
        known = p.db.claim_index({*decoded, *(c.parent for c in decoded.values())})
        checked: dict[str, Attach] = {}
        for name, claim in decoded.items():
            row = known.get(name)
            try:
                if server and row is None:
                    raise ClaimError(f"{name} was never enrolled here")
                if server and row is not None and row.pubkey is None:
                    raise ClaimError(
                        f"no certificate is recorded for {name} (enrolled by an earlier "
                        "version: enrol it again, or let it connect here directly once)"
                    )
                if (
                    row is not None
                    and row.role in (Role.RELAY, Role.CLIENT)
                    and (row.role != claim.role)
                ):
                    raise ClaimError(f"{name} is a {row.role}, not a {claim.role}")
                if server and row is not None and row.pubkey is not None and row.claim != claim.raw:
                    verify_attach(claim.raw, p.keys.get(row.pubkey, keep=False))
            except ClaimError as exc:
                refused.append((name, str(exc)))
                continue
            checked[name] = claim
        plan = judge_topology(p.cfg.name, child.name, checked, known, p.children.keys())
        refused += plan.refused
        if refused:
            names = [n for n, _ in refused]
            self.refused(
                "topology.claim_refused", child, refused[0][1], count=len(refused),
                nodes=names[:_NAMED],
            )  # fmt: skip
        p.db.route_through(
            child.name,
            plan.moves,
            keep=plan.keep if msg.reset else None,
            removed=msg.removed,
            create=not server,
        )
        moved = [name for name, *_ in plan.moves]
        # After a reset, routes that were dropped are not known by name.
        p.hooks.topology_changed(None if msg.reset else [*moved, *msg.removed])
        p.push_nodes(child, moved)

    async def on_holdings(self, child: Child, msg: Message) -> None:
        """What a relay holds: an expiry outside the years a package can be
        kept is refused (that entry only)."""
        assert isinstance(msg, Holdings)
        _relay_only(child, "holds packages for others")
        now = time.time()
        kept: dict[str, float] = {}
        bad: list[str] = []
        for package, expires in msg.packages.items():
            try:
                kept[package] = check_expiry(expires, now)
            except Invalid:
                bad.append(package)
        if bad:
            self.refused(
                "holdings.refused", child, "expiry out of range", count=len(bad),
                packages=bad[:_NAMED],
            )  # fmt: skip
        self.parent.db.set_holdings(child.name, kept)

    async def on_presence(self, child: Child, msg: Message) -> None:
        """Who is connected below a relay now. A node counts only if its
        route is believed through this relay and the relay carries that
        node's newest attach claim, which names where it is connected; the
        relay's own session is known here already."""
        assert isinstance(msg, Presence)
        _relay_only(child, "has nodes below it")
        p = self.parent
        # Only the names in the message are looked up, as for TOPOLOGY.
        known = p.db.claim_index(msg.online)
        accepted: dict[str, tuple[str, str]] = {}
        for name, raw in msg.online.items():
            row = known.get(name)
            if (
                name != child.name
                and row is not None
                and row.via == child.name
                and row.claim == raw
                and row.parent is not None
            ):
                accepted[name] = (row.parent, clean_text(msg.software.get(name, ""), 64))
        refused = len(msg.online) - len(accepted)
        if refused:
            self.refused(
                "presence.claim_refused", child, "not in this relay's proven subtree",
                count=refused,
            )  # fmt: skip
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
        p.hooks.presence_changed([*accepted, *gone])

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

    async def admit_fetch(self, child: str, fetch: Fetch) -> str | None:
        """Why ``child`` may not have ``fetch`` now (None: it may): no job
        gives it the package, or this node cannot get it (a relay starts
        fetching it from its own parent first). A session's FETCH and a
        lane's are admitted alike."""
        p = self.parent
        if not p.db.may_fetch(fetch.package, child):
            return f"no job gives {child} {fetch.package}"
        held = p.store.has(fetch.package) or p.store.active(fetch.package) is not None
        if not held and not await p.hooks.provide(fetch.package):
            waiting = p.hooks.held(fetch.package)
            if waiting:
                return f"{p.cfg.name} is {waiting}"
            return f"{fetch.package} is not available here"
        return None

    async def on_fetch(self, child: Child, msg: Message) -> None:
        """Serve a fetch in a task of its own (a relay may first have to start
        fetching the package from its parent), so the child's reader goes on."""
        assert isinstance(msg, Fetch)
        p, session, fetch = self.parent, child.session, msg

        async def run() -> None:
            with contextlib.suppress(SessionClosed):
                reason = await self.admit_fetch(child.name, fetch)
                if reason is not None:
                    session.send_nowait(FetchFail(fetch_id=fetch.fetch_id, reason=reason))
                    return
                # A bounded number of serves at once, per session and in all:
                # each holds a chunk or two and a transport buffer. A child
                # that opens many fetches and reads none holds no more than
                # its own few, and a relay with a thousand children fetching
                # together does not hold a thousand.
                async with child.fetch_slots, p.serve_slots:
                    pacer = p.pacing.for_fetch(
                        child.name, p.db.package_rate(fetch.package), asked_rate(fetch.rate)
                    )
                    await serve_fetch(session, p.store, fetch, p.cfg.name, p.observer, pacer)

        def done(task: asyncio.Task[None]) -> None:
            child.serve_ended(fetch.fetch_id)
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
        child.serve_started(fetch.fetch_id, task)

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
