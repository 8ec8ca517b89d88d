"""The parent half: accepting children and pushing work down to them.

The managing server and relays share it. It accepts TLS connections, checks
that the certificate's name and role match the HELLO and that the node is not
revoked, then pushes the jobs meant for that child or the nodes behind it.
What each message from a child does lives in ``handlers.py``; who must hear
what is decided by the pure functions in ``routing.py``. Routes come from the
sessions themselves: a child is reached over its own session, and a node
behind a relay over that relay's session, as the relay's TOPOLOGY says.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import structlog

from protocol import (
    ErrorCode,
    Hello,
    JobCancel,
    JobNotice,
    Message,
    ProtocolError,
    Revoked,
    Side,
    Welcome,
)

from ..config import NodeConfig
from ..domain import Dest, HelloPurpose, Job, Role
from ..errors import SecurityError, SessionClosed
from ..events import ChildConnected, ChildDisconnected, EventBus
from ..net.observe import TrafficObserver
from ..net.session import Session
from ..packages.manifest import Envelopes
from ..packages.store import Store
from ..state import JobDB
from .handlers import ChildHandlers
from .routing import Pushed, plan_cancels, plan_notices, route_cancels, route_work

log = structlog.get_logger("rdsd.downlinks")


@dataclass
class Child:
    """One connected child session and what has been pushed over it."""

    session: Session
    purpose: HelloPurpose
    pushed: set[Pushed] = field(default_factory=set)
    serving: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    revoked_sent: list[str] | None = None

    @property
    def name(self) -> str:
        return self.session.peer.name

    @property
    def role(self) -> Role:
        return self.session.peer.role


@dataclass
class ParentHooks:
    """Role-specific behaviour of the parent half (server vs relay)."""

    # Make sure a package is in the store or being fetched into it.
    provide: Callable[[str], Awaitable[bool]]
    # A report or announcement from below was applied (a relay forwards it).
    reports_changed: Callable[[], None]
    # The set of nodes below us changed (a relay tells its parent).
    topology_changed: Callable[[], None]
    # A relay asks its own parent for a node's pending jobs before answering.
    ask_parent: Callable[[str], Awaitable[None]] | None = None
    forward_reports: bool = False


class Downlinks:
    """Accepts children and works for them."""

    def __init__(
        self,
        cfg: NodeConfig,
        db: JobDB,
        store: Store,
        envelopes: Envelopes,
        ctx: ssl.SSLContext,
        hooks: ParentHooks,
        observer: TrafficObserver | None = None,
        bus: EventBus | None = None,
    ) -> None:
        self.cfg = cfg
        self.bus = bus if bus is not None else EventBus(name=cfg.name)
        self.db = db
        self.store = store
        self.envelopes = envelopes
        self.ctx = ctx
        self.hooks = hooks
        self.observer = observer
        self.children: dict[str, Child] = {}
        self.log = log.bind(node=cfg.name)
        self.handlers = ChildHandlers(self)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

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

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a task this half cancels when it stops."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- one child's session -----------------------------------------------------

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
        except (SecurityError, ValueError) as exc:
            self.log.warning("child.refused", reason=str(exc))
            return
        session = Session(reader, writer, Side.PARENT, peer, self.cfg.idle_timeout, self.observer)
        try:
            hello = await session.recv(self.cfg.handshake_timeout)
            purpose = self._check_hello(session, hello)
        except SessionClosed as exc:
            self.log.warning("child.handshake_failed", peer=peer.name, reason=str(exc))
            return
        except ProtocolError as exc:
            self.log.warning("child.refused", peer=peer.name, reason=str(exc))
            await session.fail(exc)
            return
        await session.send(Welcome(node=self.cfg.name, role=self.cfg.role, time=time.time()))
        child = Child(session, purpose)
        known = self.db.node(peer.name)
        if purpose is HelloPurpose.SESSION:
            old = self.children.get(peer.name)
            if old is not None:
                old.session.abort("replaced by a new session")
            self.children[peer.name] = child
        if purpose is HelloPurpose.SESSION or known is None or known.via != peer.name:
            # Even a one-shot query tells us the node sits right below us.
            self.db.upsert_node(peer.name, peer.role, via=peer.name)
            self.hooks.topology_changed()
        self.log.info("child.connected", peer=peer.name, role=peer.role, purpose=purpose)
        self.bus.publish(
            ChildConnected(source=self.cfg.name, child=peer.name, role=peer.role, purpose=purpose)
        )
        reason = "connection ended"
        try:
            if purpose is HelloPurpose.SESSION:
                await self.dispatch(only=child)
            while True:
                msg = await session.recv()
                await self.handlers.handle(child, msg)
        except SessionClosed as exc:
            reason = str(exc)
            self.log.info("child.disconnected", peer=peer.name, reason=reason)
        except ProtocolError as exc:
            # A well-formed message this child may not send: say why, hang up.
            reason = f"refused: {exc}"
            self.log.warning("child.refused", peer=peer.name, reason=str(exc))
            await session.fail(exc)
        except asyncio.CancelledError:
            reason = "shutting down"
            raise
        except Exception as exc:
            reason = f"internal error: {exc!r}"
            raise
        finally:
            self.bus.publish(
                ChildDisconnected(source=self.cfg.name, child=peer.name, reason=reason)
            )
            for task in list(child.serving.values()):
                task.cancel()
            if self.children.get(peer.name) is child:
                del self.children[peer.name]
            await session.close()

    def _check_hello(self, session: Session, msg: Message) -> HelloPurpose:
        peer = session.peer
        if not isinstance(msg, Hello):
            raise ProtocolError(f"expected HELLO, got {msg.TYPE.name}")
        if msg.node != peer.name or msg.role != peer.role:
            raise ProtocolError(
                f"HELLO says {msg.node}/{msg.role} but the certificate is {peer.name}/{peer.role}",
                ErrorCode.UNAUTHORIZED,
            )
        if peer.role not in (Role.RELAY, Role.CLIENT):
            raise ProtocolError(f"a {peer.role} cannot be a child", ErrorCode.UNAUTHORIZED)
        try:
            purpose = HelloPurpose(msg.purpose)
        except ValueError:
            raise ProtocolError(f"unknown purpose {msg.purpose!r}") from None
        row = self.db.node(peer.name)
        if row is not None and row.revoked:
            raise ProtocolError(f"node {peer.name} is revoked", ErrorCode.REVOKED)
        return purpose

    def in_subtree(self, child: str, node: str) -> bool:
        if node == child:
            return True
        row = self.db.node(node)
        return row is not None and row.via == child

    # -- pushing jobs down ----------------------------------------------------------

    async def dispatch(self, only: Child | None = None) -> None:
        """Push every due, unfinished destination to the session that leads
        to it, once per session; close sessions of revoked nodes and tell
        relays which nodes are revoked. One pass over the open work, whatever
        the number of children."""
        revoked = self.db.revoked()
        via = self.db.routes()
        live = self.children.keys()
        work = route_work(self.db.open_work(), self.cfg.name, live, via)
        cancels = route_cancels(self.db.cancelled(), live, via)
        targets = [(only.name, only)] if only is not None else list(self.children.items())
        for name, child in targets:
            if name in revoked:
                self.log.warning("child.revoked", peer=name)
                child.session.abort("revoked")
                continue
            with contextlib.suppress(SessionClosed):
                if child.role is Role.RELAY and child.revoked_sent != revoked:
                    child.revoked_sent = revoked
                    await child.session.send(Revoked(nodes=revoked))
                await self.send_notices(child, work.get(name, []), via, fresh_only=True)
                todo, keys = plan_cancels(cancels.get(name, []), child.pushed)
                child.pushed.update(keys)
                for jid, nodes in todo.items():
                    await child.session.send(JobCancel(job=jid, destinations=nodes))

    async def answer_query(self, child: Child, target: str) -> list[str]:
        """Every open job for ``target``, sent to ``child`` even if sent before."""
        items = [(j, d) for j, d in self.db.open_work() if d.node == target]
        return await self.send_notices(child, items, self.db.routes(), fresh_only=False)

    async def send_notices(
        self,
        child: Child,
        items: list[tuple[Job, Dest]],
        via: dict[str, str | None],
        fresh_only: bool,
    ) -> list[str]:
        plans, keys = plan_notices(child.name, items, via, child.pushed, fresh_only)
        child.pushed.update(keys)
        for plan in plans:
            job = plan.job
            notice = JobNotice(
                job=job.id,
                type=job.type,
                package=job.package,
                destinations=plan.nodes,
                at=job.at,
                origin=job.origin,
                generation=plan.generation,
                manifest=job.manifest,
            )
            await child.session.send(notice)
            self.log.info(
                "job.sent",
                job=job.id,
                package=job.package,
                to=child.name,
                dests=plan.nodes if len(plan.nodes) <= 10 else f"{len(plan.nodes)} nodes",
            )
        return list(dict.fromkeys(plan.job.id for plan in plans))
