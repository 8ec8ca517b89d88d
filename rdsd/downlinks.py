"""The parent half: the sessions of our children.

The managing server and relays share it. It accepts TLS connections, checks
that the certificate's name and role match the HELLO and that the node is not
revoked, then pushes the jobs meant for that child or the nodes behind it,
serves the packages they may fetch, and records their reports. Routes come
from the sessions themselves: a child is reached over its own session, and a
node behind a relay over that relay's session, as the relay's TOPOLOGY says.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import structlog

from protocol import (
    ErrorCode,
    Fetch,
    FetchCancel,
    FetchFail,
    Hello,
    Holdings,
    JobAnnounce,
    JobCancel,
    JobNotice,
    Message,
    PendingDone,
    PendingQuery,
    Ping,
    Pong,
    ProtocolError,
    Report,
    ReportAck,
    Revoked,
    Side,
    Topology,
    Welcome,
)

from .config import NodeConfig
from .jobdb import Dest, Job, JobDB
from .manifest import ManifestError, open_envelope
from .security import SecurityError
from .session import Session, SessionClosed
from .store import Store
from .transfer import serve_fetch

log = structlog.get_logger("rdsd.downlinks")
# Destinations per JOB_NOTICE, so a job for any number of nodes fits a frame.
NOTICE_BATCH = 1000


@dataclass
class Child:
    """One connected child session and what has been pushed over it."""

    session: Session
    purpose: str
    notified: set[tuple[str, str, int]] = field(default_factory=set)
    serving: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    revoked_sent: list[str] | None = None

    @property
    def name(self) -> str:
        return self.session.peer.name


@dataclass
class ParentHooks:
    """Role-specific behaviour of the parent half (server vs relay)."""

    # Make sure a package is in the store or being fetched into it.
    provide: Callable[[str], Awaitable[bool]]
    # A report from below was applied (a relay forwards it upward).
    reports_changed: Callable[[], None]
    # The set of nodes below us changed (a relay tells its parent).
    topology_changed: Callable[[], None]
    # A relay asks its own parent for a node's pending jobs before answering.
    ask_parent: Callable[[str], Awaitable[None]] | None = None
    forward_reports: bool = False


class Downlinks:
    """Accepts children and works for them."""

    def __init__(
        self, cfg: NodeConfig, db: JobDB, store: Store, ctx: ssl.SSLContext, hooks: ParentHooks
    ) -> None:
        self.cfg = cfg
        self.db = db
        self.store = store
        self.ctx = ctx
        self.hooks = hooks
        self.children: dict[str, Child] = {}
        # Package bytes sent to each child, across all its sessions.
        self.served: Counter[str] = Counter()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.log = log.bind(node=cfg.name)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None and self._server.sockets
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> None:
        assert self.cfg.listen is not None
        host, port = self.cfg.listen
        self._server = await asyncio.start_server(
            self._accept,
            host,
            port,
            ssl=self.ctx,
            ssl_handshake_timeout=self.cfg.handshake_timeout,
            limit=1024 * 1024,
        )
        self.log.info("listening", address=f"{self.address[0]}:{self.address[1]}")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for child in list(self.children.values()):
            child.session.abort("shutting down")
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._handle(reader, writer)
        except asyncio.CancelledError:
            # Shutting down. This is the connection's top-level task, and
            # asyncio's server logs a traceback for one that ends cancelled.
            pass
        except Exception:
            self.log.exception("child.crashed")
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer = Session.identify(writer)
        except SecurityError as exc:
            self.log.warning("child.refused", reason=str(exc))
            return
        session = Session(reader, writer, Side.PARENT, peer, self.cfg.idle_timeout)
        try:
            hello = await session.recv(self.cfg.handshake_timeout)
            await self._check_hello(session, hello)
        except SessionClosed as exc:
            self.log.warning("child.handshake_failed", peer=peer.name, reason=str(exc))
            return
        except ProtocolError as exc:
            self.log.warning("child.refused", peer=peer.name, reason=str(exc))
            await session.fail(exc)
            return
        assert isinstance(hello, Hello)
        await session.send(Welcome(node=self.cfg.name, role=self.cfg.role.value, time=time.time()))
        child = Child(session, hello.purpose)
        known = self.db.node(peer.name)
        if hello.purpose == "session":
            old = self.children.get(peer.name)
            if old is not None:
                old.session.abort("replaced by a new session")
            self.children[peer.name] = child
        if hello.purpose == "session" or known is None or known.via != peer.name:
            # Even a one-shot query tells us the node sits right below us.
            self.db.upsert_node(peer.name, peer.role, via=peer.name)
            self.hooks.topology_changed()
        self.log.info("child.connected", peer=peer.name, role=peer.role, purpose=hello.purpose)
        try:
            if hello.purpose == "session":
                await self.dispatch(only=child)
            while True:
                msg = await session.recv()
                await self._on_message(child, msg)
        except SessionClosed as exc:
            self.log.info("child.disconnected", peer=peer.name, reason=str(exc))
        except ProtocolError as exc:
            # A well-formed message this child may not send: say why, hang up.
            self.log.warning("child.refused", peer=peer.name, reason=str(exc))
            await session.fail(exc)
        finally:
            for task in list(child.serving.values()):
                task.cancel()
            if self.children.get(peer.name) is child:
                del self.children[peer.name]
            await session.close()

    async def _check_hello(self, session: Session, msg: Message) -> None:
        peer = session.peer
        if not isinstance(msg, Hello):
            raise ProtocolError(f"expected HELLO, got {msg.TYPE.name}")
        if msg.node != peer.name or msg.role != peer.role:
            raise ProtocolError(
                f"HELLO says {msg.node}/{msg.role} but the certificate is {peer.name}/{peer.role}",
                ErrorCode.UNAUTHORIZED,
            )
        if peer.role not in ("relay", "client"):
            raise ProtocolError(f"a {peer.role} cannot be a child", ErrorCode.UNAUTHORIZED)
        if msg.purpose not in ("session", "query"):
            raise ProtocolError(f"unknown purpose {msg.purpose!r}")
        row = self.db.node(peer.name)
        if row is not None and row.revoked:
            raise ProtocolError(f"node {peer.name} is revoked", ErrorCode.REVOKED)

    # -- messages from a child ------------------------------------------------

    async def _on_message(self, child: Child, msg: Message) -> None:
        session = child.session
        if isinstance(msg, Fetch):
            await self._start_serving(child, msg)
        elif isinstance(msg, FetchCancel):
            task = child.serving.get(msg.fetch_id)
            if task is not None:
                task.cancel()
        elif isinstance(msg, Report):
            if child.session.peer.role == "client" and msg.node != child.name:
                raise ProtocolError(
                    f"{child.name} may not report for {msg.node}", ErrorCode.UNAUTHORIZED
                )
            if not self._in_subtree(child.name, msg.node) or msg.report_id != (
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
                await session.send(ReportAck(report_id=msg.report_id))
                return
            row = self.db.node(msg.node)
            if row is not None and row.revoked:
                self.log.warning("report.refused", job=msg.job, dest=msg.node, reason="revoked")
                await session.send(ReportAck(report_id=msg.report_id))
                return
            if self.db.job(msg.job) is None:
                # Not acknowledged: the child keeps it and sends it again on its
                # next session, by when the job's announcement has arrived.
                self.log.warning("report.unknown_job", job=msg.job, dest=msg.node)
                return
            if self.db.apply_report(msg, forward=self.hooks.forward_reports):
                self.log.info(
                    "report.applied",
                    job=msg.job,
                    dest=msg.node,
                    state=msg.state,
                    detail=msg.detail,
                    package=msg.package,
                )
                self.hooks.reports_changed()
            await session.send(ReportAck(report_id=msg.report_id))
        elif isinstance(msg, PendingQuery):
            target = msg.node or child.name
            if not self._in_subtree(child.name, target):
                raise ProtocolError(
                    f"{child.name} may not ask for {target}'s jobs", ErrorCode.UNAUTHORIZED
                )
            if self.hooks.ask_parent is not None:
                await self.hooks.ask_parent(target)
            jobs = await self.answer_query(child, target)
            await session.send(PendingDone(jobs=jobs, node=msg.node))
        elif isinstance(msg, Topology):
            if child.session.peer.role != "relay":
                raise ProtocolError("only a relay has nodes below it", ErrorCode.UNAUTHORIZED)
            self._take_topology(child, msg.nodes)
            self.hooks.topology_changed()
            await self.dispatch()
        elif isinstance(msg, JobAnnounce):
            await self._on_announce(child, msg)
        elif isinstance(msg, Holdings):
            if child.session.peer.role != "relay":
                raise ProtocolError(
                    "only a relay holds packages for others", ErrorCode.UNAUTHORIZED
                )
            self.db.set_holdings(child.name, msg.packages)
        elif isinstance(msg, Ping):
            await session.send(Pong(nonce=msg.nonce))

    def _take_topology(self, child: Child, claimed: dict[str, str]) -> None:
        """A relay's TOPOLOGY replaces its last one. A node already reached
        through another connected child stays there: a relay cannot pull a
        node away from a live route by claiming it."""
        known = self.db.node_index()  # name -> (role, via, revoked), one query
        taken: set[str] = set()
        changes: list[tuple[str, str]] = []
        for name, role in claimed.items():
            if name == self.cfg.name or name == child.name or name in self.children:
                continue
            row = known.get(name)
            if row is not None and row[2]:
                continue
            if row is not None and row[1] not in (None, child.name) and row[1] in self.children:
                self.log.warning(
                    "topology.claim_refused", node=name, peer=child.name, current=row[1]
                )
                continue
            taken.add(name)
            if row is None or row[1] != child.name:
                changes.append((name, row[0] if row is not None and row[0] != "unknown" else role))
        self.db.route_through(child.name, changes, keep=taken | {child.name})

    async def _on_announce(self, child: Child, msg: JobAnnounce) -> None:
        """Record a job made at a relay so its status is known here too."""
        if child.session.peer.role != "relay" or msg.type == "transfer":
            raise ProtocolError(
                f"{child.name} may not announce a {msg.type} job", ErrorCode.UNAUTHORIZED
            )
        ack = ReportAck(report_id=f"job:{msg.job}")
        inside = [d for d in msg.destinations if self._in_subtree(child.name, d)]
        refusal = None
        try:
            manifest = open_envelope(msg.manifest, self.store.verifier)
        except ManifestError as exc:
            manifest, refusal = None, str(exc)
        known = self.db.job(msg.job)
        if manifest is not None and manifest.id != msg.package:
            refusal = f"manifest is for {manifest.id}"
        elif known is not None and (known.origin, known.type, known.package, known.manifest) != (
            msg.origin,
            msg.type,
            msg.package,
            msg.manifest,
        ):
            refusal = "a different job already has this id"
        elif not inside or not self._in_subtree(child.name, msg.origin):
            refusal = "no destination is behind the announcing relay"
        if refusal is not None:
            # Acknowledged so the relay stops sending it, but not recorded:
            # one bad announcement must not cut the relay's whole subtree off.
            self.log.warning("job.announce_refused", job=msg.job, peer=child.name, reason=refusal)
            await child.session.send(ack)
            return
        self.db.receive_job(
            msg.job,
            msg.type,
            msg.package,
            inside,
            msg.manifest,
            msg.at,
            msg.origin,
            announced=False,
        )
        self.log.info(
            "job.announced",
            job=msg.job,
            package=msg.package,
            origin=msg.origin,
            dests=msg.destinations,
        )
        await child.session.send(ack)
        self.hooks.reports_changed()

    async def _start_serving(self, child: Child, fetch: Fetch) -> None:
        session = child.session
        if not self.db.may_fetch(fetch.package, child.name):
            await session.send(
                FetchFail(
                    fetch_id=fetch.fetch_id, reason=f"no job gives {child.name} {fetch.package}"
                )
            )
            return
        held = self.store.has(fetch.package) or self.store.active(fetch.package) is not None
        if not held and not await self.hooks.provide(fetch.package):
            reason = f"{fetch.package} is not available here"
            await session.send(FetchFail(fetch_id=fetch.fetch_id, reason=reason))
            return

        async def run() -> None:
            with contextlib.suppress(SessionClosed):
                await serve_fetch(session, self.store, fetch, self.cfg.name, self.served)

        def done(task: asyncio.Task[None]) -> None:
            child.serving.pop(fetch.fetch_id, None)
            # Cancelled before it ever ran, or crashed: tell the child it is over.
            failed = task.cancelled() or task.exception() is not None
            if failed and fetch.fetch_id in session.conn.open_fetches:
                fail = FetchFail(fetch_id=fetch.fetch_id, reason="cancelled")
                self._spawn(self._send_quietly(session, fail))

        task = asyncio.create_task(run())
        task.add_done_callback(done)
        child.serving[fetch.fetch_id] = task

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _send_quietly(session: Session, msg: Message) -> None:
        with contextlib.suppress(SessionClosed):
            await session.send(msg)

    def _in_subtree(self, child: str, node: str) -> bool:
        if node == child:
            return True
        row = self.db.node(node)
        return row is not None and row.via == child

    # -- pushing jobs down ------------------------------------------------------

    def _route_name(self, node: str, via: dict[str, str | None]) -> str | None:
        """The child session that leads to ``node``, by name, if connected."""
        if node in self.children:
            return node
        hop = via.get(node)
        return hop if hop in self.children else None

    async def dispatch(self, only: Child | None = None) -> None:
        """Push every due, unfinished destination to the session that leads
        to it, once per session; close sessions of revoked nodes and tell
        relays which nodes are revoked. One pass over the open work, whatever
        the number of children."""
        revoked = self.db.revoked()
        via = self.db.routes()
        work: dict[str, list[tuple[Job, Dest]]] = {}
        for job, dest in self.db.open_work():
            hop = self._route_name(dest.node, via) if dest.node != self.cfg.name else None
            if hop is not None:
                work.setdefault(hop, []).append((job, dest))
        cancels: dict[str, list[tuple[str, str]]] = {}
        for jid, nodes in self.db.cancelled():
            for n in nodes:
                hop = self._route_name(n, via)
                if hop is not None:
                    cancels.setdefault(hop, []).append((jid, n))
        targets = [(only.name, only)] if only is not None else list(self.children.items())
        for name, child in targets:
            if name in revoked:
                self.log.warning("child.revoked", peer=name)
                child.session.abort("revoked")
                continue
            with contextlib.suppress(SessionClosed):
                if child.session.peer.role == "relay" and child.revoked_sent != revoked:
                    child.revoked_sent = revoked
                    await child.session.send(Revoked(nodes=revoked))
                await self._send_notices(child, work.get(name, []), via, fresh_only=True)
                await self._push_cancels(child, cancels.get(name, []))

    async def answer_query(self, child: Child, target: str) -> list[str]:
        """Every open job for ``target``, sent to ``child`` even if sent before."""
        items = [(j, d) for j, d in self.db.open_work() if d.node == target]
        return await self._send_notices(child, items, self.db.routes(), fresh_only=False)

    async def _send_notices(
        self,
        child: Child,
        items: list[tuple[Job, Dest]],
        via: dict[str, str | None],
        fresh_only: bool,
    ) -> list[str]:
        batches: dict[tuple[str, int], tuple[Job, list[str]]] = {}
        for job, dest in items:
            if job.origin == child.name or via.get(job.origin) == child.name:
                continue  # made below: the child already has it
            key = (job.id, dest.node, dest.generation)
            if fresh_only and key in child.notified:
                continue
            child.notified.add(key)
            batches.setdefault((job.id, dest.generation), (job, []))[1].append(dest.node)
        for (_, generation), (job, all_nodes) in batches.items():
            for i in range(0, len(all_nodes), NOTICE_BATCH):
                nodes = all_nodes[i : i + NOTICE_BATCH]
                notice = JobNotice(
                    job=job.id,
                    type=job.type,
                    package=job.package,
                    destinations=nodes,
                    at=job.at,
                    origin=job.origin,
                    generation=generation,
                    manifest=job.manifest,
                )
                await child.session.send(notice)
                self.log.info(
                    "job.sent",
                    job=job.id,
                    package=job.package,
                    to=child.name,
                    dests=nodes if len(nodes) <= 10 else f"{len(nodes)} nodes",
                )
        return list(dict.fromkeys(jid for jid, _ in batches))

    async def _push_cancels(self, child: Child, cancelled: list[tuple[str, str]]) -> None:
        """Tell a child, once per session, which destinations it leads to
        were cancelled, so a node that was away does not run them later."""
        todo: dict[str, list[str]] = {}
        for jid, node in cancelled:
            if (jid, node, -1) not in child.notified:
                child.notified.add((jid, node, -1))
                todo.setdefault(jid, []).append(node)
        for jid, nodes in todo.items():
            await child.session.send(JobCancel(job=jid, destinations=nodes))
