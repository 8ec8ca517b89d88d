"""The child half: our one session to the parent.

Relays and clients share it. It connects upward with exponential backoff and
jitter, says HELLO, and from then on routes what the parent sends: job
notices and cancels to the node, fetch answers to the running fetches, report
acknowledgements to the outbox. When the session drops, running fetches are
woken with the news and the link connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

from protocol import (
    MAX_REVOKED_TOTAL,
    MAX_SOFTWARE,
    Chunk,
    FetchEnd,
    FetchFail,
    Hello,
    JobCancel,
    JobNotice,
    Message,
    MessageType,
    PendingDone,
    PendingQuery,
    Ping,
    Pong,
    Report,
    ReportAck,
    Revoked,
)

from .._version import VERSION
from ..claims import ClaimSigner
from ..config import NodeConfig
from ..domain import HelloPurpose, Role
from ..errors import SessionClosed
from ..net.observe import TrafficObserver
from ..net.session import Peer, Session, open_child_session
from ..net.transfer import FetchRouter
from ..util.backoff import Backoff

log = structlog.get_logger("rdsd.uplink")
# A session that lasted this long (seconds) got well past its handshake: the
# parent works, and the backoff starts over. One that a crashing parent
# drops at once ends far sooner.
STABLE_SESSION = 2.0


def software() -> str:
    """What this node says in HELLO.software: ``rdsd/<version>``, so the
    parent can show which version each node runs."""
    return f"rdsd/{VERSION}"[:MAX_SOFTWARE]


class UplinkHandler(Protocol):
    """What the node does with what the parent sends."""

    async def on_connected(self, link: Uplink) -> None: ...
    async def on_job_notice(self, notice: JobNotice) -> None: ...
    async def on_job_cancel(self, cancel: JobCancel) -> None: ...
    async def on_revoked(self, nodes: list[str]) -> None: ...
    def on_report_ack(self, report_id: str) -> None: ...


class Uplink:
    """One child-side session, reconnecting for as long as it runs."""

    def __init__(
        self,
        cfg: NodeConfig,
        ctx: ssl.SSLContext,
        handler: UplinkHandler,
        purpose: HelloPurpose = HelloPurpose.SESSION,
        observer: TrafficObserver | None = None,
        counter: Callable[[], int] | None = None,
    ) -> None:
        assert cfg.parent is not None
        self.cfg = cfg
        # This node's own claims (where it is attached, the reports it makes)
        # are signed with its certificate's key; ``counter`` numbers attach
        # claims (the job database keeps it, so it only grows).
        self.signer = ClaimSigner.from_file(cfg.paths.key)
        self._counter = counter or (lambda: time.time_ns() // 1000)
        self.ctx = ctx
        self.handler = handler
        self.purpose = purpose
        self.observer = observer
        self.router = FetchRouter()
        self.session: Session | None = None
        self.parent_role: Role | None = None
        self.parent_name = ""
        # The parent takes lanes (its WELCOME said so, and no lane to it
        # has been refused during this session).
        self.lanes = False
        self.connected = asyncio.Event()
        self._lost = asyncio.Event()
        self.last_error = ""
        # Set by close() (the node stopping, rdsft done): the end of the
        # session is ours, not a loss, and the link must not come back.
        self.closing = False
        self._pending: dict[str | None, asyncio.Future[list[str]]] = {}
        # A revocation list arriving in batches (REVOKED with ``more``).
        self._revoked_parts: list[str] = []
        # What went up on the current session and awaits its ack there.
        self.sent: set[str] = set()
        self.reports_upto = 0  # outbox position sent on the current session
        # Loop time of the last send or acknowledgement: what waits longer
        # than ``idle_timeout`` for its ack (the parent could not record it)
        # is sent again on the same session (``ack_overdue``).
        self._progress_at = 0.0
        self._ping = 0
        self.log = log.bind(node=cfg.name)

    @property
    def parent_address(self) -> str:
        host, port = self.cfg.parent  # type: ignore[misc]
        return f"{host}:{port}"

    @property
    def resumes(self) -> bool:
        """A client below a relay starts a failed transfer over; every other
        hop (below the server, and between relays) resumes."""
        return self.parent_role is not Role.RELAY or self.cfg.role is Role.RELAY

    def hello(self, parent: Peer, purpose: HelloPurpose | None = None) -> Hello:
        """HELLO with this node's attach claim naming ``parent`` (from its
        certificate), signed now with a fresh counter; for this link's
        purpose unless another is given (a lane's)."""
        claim = self.signer.attach(
            self.cfg.name, self.cfg.role, parent.name, self._counter(), time.time()
        )
        return Hello(
            node=self.cfg.name,
            role=self.cfg.role,
            purpose=purpose or self.purpose,
            software=software(),
            attach=claim,
        )

    async def connect_once(self) -> Session:
        host, port = self.cfg.parent  # type: ignore[misc]
        hello = self.hello
        session, welcome = await open_child_session(
            host,
            port,
            self.ctx,
            hello,
            self.cfg.handshake_timeout,
            self.cfg.idle_timeout,
            self.observer,
        )
        self.session = session
        self.sent = set()
        self.reports_upto = 0
        self.parent_role = Role(welcome.role)
        self.parent_name = welcome.node
        self.lanes = welcome.lanes
        self._lost.clear()
        self.connected.set()
        self.log.info(
            "uplink.connected",
            parent=welcome.node,
            parent_role=welcome.role,
            parent_address=self.parent_address,
        )
        return session

    async def run(self) -> None:
        """Connect, serve, reconnect with backoff; until cancelled or closing.
        A reconnect after a short-lived session waits through the backoff
        (with jitter), which starts over only after a session that lasted: a
        parent that drops or crashes each session at once is not hammered,
        and a link lost after a long session comes back at once."""
        backoff = Backoff(self.cfg.reconnect_min, self.cfg.reconnect_max)
        loop = asyncio.get_running_loop()
        while not self.closing:
            try:
                session = await self.connect_once()
            except Exception as exc:
                self.last_error = str(exc) or type(exc).__name__
                if isinstance(exc, TimeoutError):
                    self.last_error = f"no answer within {self.cfg.handshake_timeout:.0f}s"
                self.log.warning(
                    "uplink.connect_failed",
                    parent_address=self.parent_address,
                    reason=self.last_error,
                    retry_in=round(backoff.current, 2),
                )
                await backoff.wait()
                continue
            began = loop.time()
            try:
                await self.serve(session)
            except Exception:
                # A bug in handling one message must not end the link for good.
                self.log.exception("uplink.crashed")
            if loop.time() - began >= STABLE_SESSION:
                backoff.reset()  # it lasted: connect again at once
                continue
            self.log.info("uplink.reconnecting", retry_in=round(backoff.current, 2))
            await backoff.wait()

    async def serve(self, session: Session) -> None:
        """Read until the session ends, dispatching every message."""
        pinger = asyncio.create_task(self._keepalive(session))
        try:
            await self.handler.on_connected(self)
            while True:
                msg = await session.recv()
                try:
                    await self._dispatch(msg)
                except sqlite3.Error as exc:
                    # Our database cannot take it now (a full disk): the link
                    # stays; what was not recorded comes again (a report's ack
                    # is asked for again, a job on the next query or session).
                    self.log.warning("uplink.not_recorded", message=msg.TYPE.name, reason=str(exc))
        except SessionClosed as exc:
            self.last_error = str(exc)
            if self.closing:
                self.log.info("uplink.closed", reason=str(exc))
            else:
                self.log.warning(
                    "uplink.lost",
                    parent=self.parent_name,
                    parent_address=self.parent_address,
                    reason=str(exc),
                )
        finally:
            pinger.cancel()
            self._revoked_parts = []  # a list cut off with the session is not a list
            self.connected.clear()
            self._lost.set()
            self.session = None
            self.router.session_lost()
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(SessionClosed(self.last_error))
            self._pending.clear()
            await session.close(self.last_error)

    async def _dispatch(self, msg: Message) -> None:
        handler = self.TABLE.get(msg.TYPE)
        if handler is not None:
            await handler(self, msg)

    async def _on_fetch_answer(self, msg: Message) -> None:
        assert isinstance(msg, (Chunk, FetchEnd, FetchFail))
        await self.router.deliver(msg)

    async def _on_job_notice(self, msg: Message) -> None:
        assert isinstance(msg, JobNotice)
        await self.handler.on_job_notice(msg)

    async def _on_report_ack(self, msg: Message) -> None:
        assert isinstance(msg, ReportAck)
        self.acked()
        self.handler.on_report_ack(msg.report_id)

    async def _on_pending_done(self, msg: Message) -> None:
        assert isinstance(msg, PendingDone)
        fut = self._pending.pop(msg.node, None)
        if fut is not None and not fut.done():
            fut.set_result(msg.jobs)

    async def _on_job_cancel(self, msg: Message) -> None:
        assert isinstance(msg, JobCancel)
        await self.handler.on_job_cancel(msg)

    async def _on_revoked(self, msg: Message) -> None:
        """Gather a list sent in batches; replace ours once it is whole, so
        no name is ever briefly not revoked between two batches."""
        assert isinstance(msg, Revoked)
        parts = self._revoked_parts
        if len(parts) + len(msg.nodes) > MAX_REVOKED_TOTAL:
            parts.clear()
            if self.session is not None:
                self.session.abort(f"revocation list over {MAX_REVOKED_TOTAL} names")
            return
        parts.extend(msg.nodes)
        if msg.more:
            return
        self._revoked_parts = []
        await self.handler.on_revoked(parts)

    async def _on_ping(self, msg: Message) -> None:
        assert isinstance(msg, Ping)
        if self.session is not None:
            await self.session.send(Pong(nonce=msg.nonce))

    #: What each message from the parent does; PONG needs nothing.
    TABLE: dict[MessageType, Callable[[Uplink, Message], Awaitable[None]]] = {
        MessageType.CHUNK: _on_fetch_answer,
        MessageType.FETCH_END: _on_fetch_answer,
        MessageType.FETCH_FAIL: _on_fetch_answer,
        MessageType.JOB_NOTICE: _on_job_notice,
        MessageType.REPORT_ACK: _on_report_ack,
        MessageType.PENDING_DONE: _on_pending_done,
        MessageType.JOB_CANCEL: _on_job_cancel,
        MessageType.REVOKED: _on_revoked,
        MessageType.PING: _on_ping,
    }

    async def _keepalive(self, session: Session) -> None:
        with contextlib.suppress(SessionClosed):
            while True:
                await asyncio.sleep(self.cfg.ping_interval)
                self._ping += 1
                await session.send(Ping(nonce=self._ping))

    async def close(self, reason: str) -> None:
        """End the link on purpose (shutdown, or ``rdsft`` done): say GOODBYE
        and neither warn about the loss nor connect again."""
        self.closing = True
        if self.session is not None:
            await self.session.goodbye(reason)

    async def wait_session(self, timeout: float) -> Session:
        async with asyncio.timeout(timeout):
            while True:
                await self.connected.wait()
                if self.session is not None and not self.session.closed:
                    return self.session
                # Connected but already closing: wait for the loss to land.
                await self._lost.wait()

    async def query_pending(self, timeout: float, node: str | None = None) -> list[str]:
        """Ask for this node's pending jobs (or, on a relay, a child's); the
        notices arrive through the handler before the answer, so they are
        recorded when this returns."""
        session = await self.wait_session(timeout)
        fut = self._pending.get(node)
        if fut is None or fut.done():
            fut = asyncio.get_running_loop().create_future()
            self._pending[node] = fut
            await session.send(PendingQuery(node=node))
        async with asyncio.timeout(timeout):
            return await asyncio.shield(fut)

    def send_up(self, messages: list[tuple[str, Message]]) -> None:
        """Queue each ``(ack id, message)`` not yet sent on this session; the
        rest are in flight and will be sent again on a new session, or on
        this one after ``resend``."""
        session = self.session
        if session is None or session.closed:
            return
        with contextlib.suppress(SessionClosed):
            for key, msg in messages:
                if key not in self.sent:
                    self.sent.add(key)
                    session.send_nowait(msg)
                    self.acked()

    def send_reports(self, rows: list[tuple[int, Report]]) -> bool:
        """Queue outbox rows (position, report) past what this session has
        sent; False when there is no session to send them on. A new session
        starts from the beginning of the outbox again."""
        session = self.session
        if session is None or session.closed:
            return False
        try:
            for position, report in rows:
                if position > self.reports_upto:
                    if not report.sig and (report.origin or report.node) == self.cfg.name:
                        # Our own change: signed as it leaves (relays forward
                        # other nodes' reports with their origin's signature).
                        report = self.signer.report(report)
                    session.send_nowait(report)
                    self.reports_upto = position
                    self.acked()
        except SessionClosed:
            return False
        return True

    def acked(self) -> None:
        """Something went up or was acknowledged: the link is making progress."""
        self._progress_at = asyncio.get_running_loop().time()

    def ack_overdue(self) -> bool:
        """Has what was sent on this session waited ``idle_timeout`` without
        any acknowledgement (the parent could not record it)?"""
        if self.session is None or (self.reports_upto == 0 and not self.sent):
            return False
        return asyncio.get_running_loop().time() - self._progress_at >= self.cfg.idle_timeout

    def resend(self) -> None:
        """Send everything unacknowledged again on this session (a repeat
        changes nothing upstream)."""
        self.reports_upto = 0
        self.sent.clear()
        self.acked()
