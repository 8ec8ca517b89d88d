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
import socket
import sqlite3
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from protocol import (
    LANE_MAGIC,
    MAX_SOFTWARE,
    ErrorCode,
    Fetch,
    Hello,
    JobNotice,
    Message,
    Ping,
    ProtocolError,
    Report,
    ReportAck,
    Side,
    Welcome,
)

from ..claims import Attach, ClaimError, Keys, verify_attach
from ..config import NodeConfig
from ..domain import DestState, HelloPurpose, JobHead, Role
from ..errors import SecurityError, SessionClosed, StoreError
from ..events import ChildConnected, ChildDisconnected, EventBus
from ..net.lane import LaneServe, ParentLane, start_thread
from ..net.observe import TrafficObserver
from ..net.pace import LinkPacing
from ..net.session import Peer, Session, Stream
from ..packages.manifest import Envelopes
from ..packages.store import Store
from ..state import Applied, JobDB
from ..util.memory import give_back
from ..util.turns import take_turn
from ..util.windows import pace_to_wire
from ..validate import Invalid, check_time, clean_text
from .handlers import ChildHandlers, asked_rate
from .routing import (
    Pushed,
    by_hop,
    cancel_batches,
    in_subtree,
    made_below,
    plan_push,
    revoked_batches,
)

log = structlog.get_logger("rdsd.downlinks")
#: Connections between accept and WELCOME at once (TCP accepted, TLS, the
#: preamble and HELLO); the rest wait in the listen backlog (the kernel caps
#: it at net.core.somaxconn). The default of ``[limits] handshakes``.
MAX_HANDSHAKES = 128
LISTEN_BACKLOG = 4096
#: Fetches served at once; the rest wait their turn (first come, first
#: served). Each serve holds up to two chunks read ahead and a transport
#: buffer, so this bounds what fan-out to many children costs in memory.
MAX_SERVES = 64
#: Reports applied in one transaction, in one turn of the loop; more that
#: arrived together wait for the next turn.
REPORT_BATCH = 128
#: How long the first report of a batch waits for others to join it.
REPORT_LINGER = 0.01

# What a child's stream buffers, beyond the frame in progress, before
# reading from its socket pauses. Children send only control frames, so a small
# buffer costs nothing, and a connection that pours in bytes before it has
# even said HELLO holds at most this much before it is refused.
STREAM_LIMIT = 64 * 1024
# Failed TLS handshakes are logged at most once per this many seconds per
# peer host, and at most HANDSHAKE_LOG_BURST lines per interval in all: a
# scanner or a misconfigured fleet must not flood the log.
HANDSHAKE_LOG_INTERVAL = 10.0
HANDSHAKE_LOG_BURST = 20
#: Failures held back by the rate limit are summed up in one line this
#: long after the first of them.
HANDSHAKE_SUMMARY_INTERVAL = 60.0
_HANDSHAKE_HOSTS_KEPT = 4096
#: Once connections have ended, this long later the memory they freed goes
#: back to the system (``util.memory``); again at most this often.
GIVE_BACK_DELAY = 2.0
#: How long a lane's FETCH may wait for admission and a serve slot: well
#: under the lane thread's own wait for the answer (``net/lane.LOOP_WAIT``).
LANE_ADMIT_WAIT = 120.0


class HandshakeLog:
    """Rate limit for ``child.tls_failed`` lines; counts what it holds back
    and says so on the next line it lets through for that host."""

    def __init__(self) -> None:
        self._hosts: dict[str, tuple[float, int]] = {}
        self._window = -float("inf")
        self._lines = 0
        # Held back since the last summary: failures, and from how many hosts.
        self.unlogged = 0
        self.unlogged_hosts: set[str] = set()

    def admit(self, host: str, now: float) -> int | None:
        """None to stay silent, else how many failures of ``host`` went unlogged."""
        if now - self._window >= HANDSHAKE_LOG_INTERVAL:
            self._window, self._lines = now, 0
        last, held = self._hosts.get(host, (-float("inf"), 0))
        if now - last < HANDSHAKE_LOG_INTERVAL or self._lines >= HANDSHAKE_LOG_BURST:
            self._hosts[host] = (last, held + 1)
            self.unlogged += 1
            if len(self.unlogged_hosts) < _HANDSHAKE_HOSTS_KEPT:
                self.unlogged_hosts.add(host)
            return None
        if len(self._hosts) >= _HANDSHAKE_HOSTS_KEPT:
            self._hosts.clear()
        self._hosts[host] = (now, 0)
        self._lines += 1
        return held

    def summary(self) -> tuple[int, int]:
        """Failures held back since the last summary and from how many
        hosts; starts the count again."""
        out = (self.unlogged, len(self.unlogged_hosts))
        self.unlogged = 0
        self.unlogged_hosts = set()
        return out


@dataclass(slots=True)
class Child:
    """One connected child session and what has been pushed over it.

    Most children are idle most of the time, and a relay holds thousands:
    what only a child that fetches or asks needs (its serves, their slots,
    its side tasks) is made when first needed and dropped when done."""

    session: Session
    purpose: HelloPurpose
    # Fetches this session may have served at once; the rest wait in
    # ``fetch_slots``, in order, without reading anything
    # (``[limits] fetches_per_session``).
    fetch_limit: int = 2
    pushed: Pushed = field(default_factory=dict)
    revoked_sent: list[str] | None = None
    _serving: dict[int, asyncio.Task[None]] | None = None
    _fetch_slots: asyncio.Semaphore | None = None
    _tasks: set[asyncio.Task[None]] | None = None

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Work for this child that may wait (on our own parent): it runs
        beside the child's reader and ends with the session."""
        task = asyncio.create_task(coro)
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if self._tasks is not None:
            self._tasks.discard(task)
            if not self._tasks:
                self._tasks = None

    @property
    def fetch_slots(self) -> asyncio.Semaphore:
        if self._fetch_slots is None:
            self._fetch_slots = asyncio.Semaphore(self.fetch_limit)
        return self._fetch_slots

    @property
    def serving(self) -> dict[int, asyncio.Task[None]]:
        """The serves of this session's fetches still running, by fetch id
        (an empty dict, not kept, when there are none)."""
        return self._serving if self._serving is not None else {}

    def serve_started(self, fetch_id: int, task: asyncio.Task[None]) -> None:
        if self._serving is None:
            self._serving = {}
        self._serving[fetch_id] = task

    def serve_ended(self, fetch_id: int) -> None:
        if self._serving is not None:
            self._serving.pop(fetch_id, None)
            if not self._serving:
                # Only serves in ``serving`` take fetch slots: with none left,
                # nothing holds or waits for one.
                self._serving = self._fetch_slots = None

    @property
    def holds_fetch_state(self) -> bool:
        """Anything made for fetches or side work is still held (an idle
        child that never fetched holds none)."""
        return not (self._serving is None and self._fetch_slots is None and self._tasks is None)

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
    # (None: anything may have changed; else the names that did.)
    topology_changed: Callable[[Iterable[str] | None], None]
    # Who is connected below us changed (a relay tells its parent).
    # (None: anyone may have; else the names that did.)
    presence_changed: Callable[[Iterable[str] | None], None] = lambda names: None
    # Why a package cannot be provided now (a relay's transfer window), if so.
    held: Callable[[str], str | None] = lambda package: None
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
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(cfg.max_handshakes)
        # Open connections per certificate name, after HELLO.
        self.connections: Counter[str] = Counter()
        self.serve_slots = asyncio.Semaphore(MAX_SERVES)
        # Upload limits, shared by every fetch served; a reload changes them.
        self.pacing = LinkPacing(cfg.upload_rate, cfg.per_child_rate)
        self._reports: list[tuple[Child, Report]] = []  # to apply in one commit
        self._report_timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self._rev = 0  # the job revision routed so far
        self._due_mark = time.time()  # execution times up to here were routed
        self._pushing = asyncio.Lock()  # one routing pass at a time
        self._envelopes: dict[str, bytes] = {}
        self._handshakes = HandshakeLog()
        self.keys = Keys()  # loaded public keys, for checking claims
        self._summary: asyncio.TimerHandle | None = None
        self._lanes: set[ParentLane] = set()
        self._give_back: asyncio.TimerHandle | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self._listener is not None
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> None:
        assert self.cfg.listen is not None
        host, port = self.cfg.listen
        # Nothing is connected to a parent half that has just started.
        self.db.presence_clear()
        self._listener = await _listen(host, port)
        self._accepting = asyncio.create_task(self._accept_loop(self._listener))
        self.log.info("listening", address=f"{self.address[0]}:{self.address[1]}")

    async def stop(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self._listener is not None:
            self._listener.close()
        for child in list(self.children.values()):
            child.session.abort("shutting down")
        for lane in list(self._lanes):
            lane.abort()
        if self._summary is not None:
            self._summary.cancel()
            self._summarise()
        if self._give_back is not None:
            self._give_back.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        # Reports already read are recorded before the database closes; their
        # acknowledgements have nowhere to go, so the children send them again
        # and the duplicates are recognised.
        if self._report_timer is not None:
            self._report_timer.cancel()
        while self._reports:
            self._apply_batch()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a task this half cancels when it stops."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- one child's session -----------------------------------------------------

    async def _accept_loop(self, listener: socket.socket) -> None:
        """Accept plain TCP and do the TLS handshake per connection here, so
        a failed handshake is ours to log with the peer's address (asyncio's
        own TLS server drops it silently)."""
        loop = asyncio.get_running_loop()
        while True:
            # A connection storm (a relay restarting under thousands of
            # clients) waits in the kernel's backlog rather than starting
            # thousands of handshakes that all crawl past their timeout:
            # only MAX_HANDSHAKES are between accept and WELCOME at once.
            await self._slots.acquire()
            try:
                sock, addr = await loop.sock_accept(listener)
            except OSError as exc:
                self._slots.release()
                # Out of file descriptors, say: keep the listener, try later.
                self.log.warning("accept_failed", reason=str(exc), retry_in=1.0)
                await asyncio.sleep(1.0)
                continue
            except BaseException:
                self._slots.release()
                raise
            self.spawn(self._accept(sock, _format_address(addr), _Slot(self._slots)))

    async def _accept(self, sock: socket.socket, address: str, slot: _Slot) -> None:
        # One deadline for TLS, the preamble and HELLO together: a peer that
        # trickles a byte at a time cannot stretch it read by read.
        deadline = asyncio.get_running_loop().time() + self.cfg.handshake_timeout
        try:
            first = await self._first_byte(sock, address, deadline)
            if first == LANE_MAGIC[:1]:
                await self._lane(sock, address, slot, deadline)
                return
            if not first:
                sock.close()
                return
            stream = await self._start_tls(sock, address)
            if stream is None:
                return
            try:
                # Welcomed, the child is served from this frame: no frame in
                # between holds its HELLO while it idles.
                child = await self._admit(stream, slot, deadline, address)
                if child is not None:
                    try:
                        await self._serve_child(child, address)
                    finally:
                        self._release(child.name)
            except Exception:
                self.log.exception("child.crashed", peer_address=address)
            finally:
                if stream.transport is not None:
                    stream.transport.close()
        finally:
            slot.release()
            self._ended()

    async def _first_byte(self, sock: socket.socket, address: str, deadline: float) -> bytes:
        """The connection's first byte, left in the socket: a TLS record
        (a session) or the lane preamble. Empty when the peer went away or
        sent nothing in time (then the connection is closed here)."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        fd = sock.fileno()
        loop.add_reader(fd, _set_once, ready)
        failure: Exception | None = None
        try:
            async with asyncio.timeout_at(deadline):
                await ready
            first = sock.recv(1, socket.MSG_PEEK)
        except (OSError, TimeoutError) as exc:
            first, failure = b"", exc
        finally:
            # Before any close: a selector loop must not keep a closed descriptor.
            loop.remove_reader(fd)
        if failure is not None:
            sock.close()
            self.handshake_failed(address, failure)
        return first

    async def _lane(self, sock: socket.socket, address: str, slot: _Slot, deadline: float) -> None:
        """A lane (``net/lane.py``): its preamble here, everything after it
        in a thread of its own, which asks this loop for every check."""
        loop = asyncio.get_running_loop()
        got = b""
        try:
            async with asyncio.timeout_at(deadline):
                while len(got) < len(LANE_MAGIC):
                    part = await loop.sock_recv(sock, len(LANE_MAGIC) - len(got))
                    if not part:
                        break
                    got += part
        except (OSError, TimeoutError) as exc:
            got = b""
            self.handshake_failed(address, exc)
        if got != LANE_MAGIC:
            sock.close()
            if got:
                self.handshake_failed(address, ConnectionError("neither TLS nor a lane preamble"))
            return
        sock.setblocking(True)
        lane = ParentLane(
            self,
            loop,
            sock,
            self.ctx,
            self._welcome(),
            time.monotonic() + max(0.0, deadline - loop.time()),
            self.cfg.idle_timeout,
            slot.release,
        )
        self._lanes.add(lane)
        done = start_thread(lane.run, "rdsd-lane-serve")
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            lane.abort()
            with contextlib.suppress(BaseException):
                await done
            raise
        except Exception:
            self.log.exception("lane.crashed", peer_address=address)
        finally:
            self._lanes.discard(lane)

    # -- what a lane's thread asks of this loop (net/lane.LaneHost) ---------------

    def admit_lane(self, peer: Peer, hello: Message) -> None:
        """A lane's HELLO, checked as a session's; it counts against the
        node's connection cap and never becomes a route."""
        purpose = self._check_hello(peer, hello)
        if purpose is not HelloPurpose.LANE:
            raise ProtocolError(f"a lane's HELLO says purpose {purpose}")
        assert isinstance(hello, Hello)
        self._check_attach(peer, hello)
        self._check_connections(peer.name, purpose)
        self.connections[peer.name] += 1

    def lane_closed(self, peer: Peer) -> None:
        self.connections[peer.name] -= 1
        if self.connections[peer.name] <= 0:
            del self.connections[peer.name]

    async def open_lane_fetch(self, peer: Peer, fetch: Fetch) -> LaneServe | str:
        # Bounded below the lane thread's own wait for this answer, so a
        # serve slot is never taken for a thread that stopped waiting.
        try:
            async with asyncio.timeout(LANE_ADMIT_WAIT):
                reason = await self.handlers.admit_fetch(peer.name, fetch)
                if reason is not None:
                    return reason
                await self.serve_slots.acquire()
        except TimeoutError:
            return f"{self.cfg.name} is busy: no serve slot within {LANE_ADMIT_WAIT:.0f}s"
        try:
            reading = self.store.open_reading(fetch.package, fetch.offset)
        except (StoreError, OSError) as exc:
            self.serve_slots.release()
            return str(exc) or type(exc).__name__
        pacer = self.pacing.for_fetch(
            peer.name, self.db.package_rate(fetch.package), asked_rate(fetch.rate)
        )
        return LaneServe(reading, pacer, fetch)

    def serve_ended(self, peer: Peer, serve: LaneServe, sent: int, whole: bool) -> None:
        self.store.close_reading(serve.reading, whole)
        self.serve_slots.release()

    def serve_corrupt(self, package: str, offset: int) -> None:
        self.store.quarantine(package, offset)

    def chunk_sent(self, peer: Peer, nbytes: int) -> None:
        if self.observer is not None:
            self.observer.frames_sent(peer.name, nbytes)
            self.observer.package_served(peer.name, nbytes)

    def handshake_failed(self, address: str, exc: Exception) -> None:
        """A connection that failed before HELLO (TLS, or nothing sent in
        time): rate-limited per host, with a summary for the rest."""
        held = self._handshakes.admit(address.rsplit(":", 1)[0], time.monotonic())
        if held is not None:
            reason: object = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else exc
            if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
                # Which check failed: an expired certificate, another CA.
                reason = f"{reason}: {exc.verify_message}"
            self.log.warning(
                "child.tls_failed",
                peer_address=address,
                reason=str(reason) or type(exc).__name__,
                unlogged_before=held,
            )
        elif self._summary is None:
            self._summary = asyncio.get_running_loop().call_later(
                HANDSHAKE_SUMMARY_INTERVAL, self._summarise
            )

    def _welcome(self) -> Welcome:
        return Welcome(node=self.cfg.name, role=self.cfg.role, time=time.time(), lanes=True)

    def _ended(self) -> None:
        """A connection ended: what it used goes back to the system shortly,
        with whatever else ends meanwhile (one trim per burst)."""
        if self._give_back is None:
            self._give_back = asyncio.get_running_loop().call_later(
                GIVE_BACK_DELAY, self._give_back_now
            )

    def _give_back_now(self) -> None:
        self._give_back = None
        started = time.perf_counter()
        if give_back():
            self.log.debug(
                "memory.given_back", took_ms=round((time.perf_counter() - started) * 1e3, 2)
            )

    async def _start_tls(self, sock: socket.socket, address: str) -> Stream | None:
        """The TLS handshake, bounded by the handshake timeout; a failure is
        logged (rate-limited per host) with the peer's address and reason."""
        loop = asyncio.get_running_loop()
        protocol = Stream(Side.PARENT, read_ahead=STREAM_LIMIT)
        try:
            await loop.connect_accepted_socket(
                lambda: protocol,
                sock,
                ssl=self.ctx,
                ssl_handshake_timeout=self.cfg.handshake_timeout,
            )
        except (OSError, TimeoutError, EOFError) as exc:
            sock.close()
            self.handshake_failed(address, exc)
            return None
        return protocol

    def _summarise(self) -> None:
        """One line for the TLS failures the rate limit held back."""
        self._summary = None
        count, hosts = self._handshakes.summary()
        if count:
            self.log.warning(
                "child.tls_failed_summary",
                unlogged=count,
                hosts=hosts,
                interval=HANDSHAKE_SUMMARY_INTERVAL,
            )

    async def _admit(
        self, stream: Stream, slot: _Slot, deadline: float, address: str
    ) -> Child | None:
        """The child's HELLO, checked, and our WELCOME: the child, counted
        against its node's connections (``_release`` when it ends) and
        attached below us; None if it was refused or went away."""
        assert stream.transport is not None
        try:
            peer = Session.identify(stream.transport)
        except (SecurityError, ValueError) as exc:
            self.log.warning("child.refused", peer_address=address, reason=str(exc))
            return None
        session = Session(stream, peer, self.cfg.idle_timeout, self.observer)
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    hello = await session.recv(self.cfg.handshake_timeout)
            except TimeoutError:
                raise ProtocolError(
                    f"no HELLO within {self.cfg.handshake_timeout:g}s of connecting",
                    ErrorCode.TIMEOUT,
                ) from None
            purpose = self._check_hello(peer, hello)
            assert isinstance(hello, Hello)
            if purpose is HelloPurpose.LANE:
                raise ProtocolError("a lane opens with the lane preamble, not in a session")
            attach = self._check_attach(peer, hello)
            self._check_connections(peer.name, purpose)
        except SessionClosed as exc:
            self.log.warning(
                "child.handshake_failed", peer=peer.name, peer_address=address, reason=str(exc)
            )
            return None
        except ProtocolError as exc:
            self.log.warning("child.refused", peer=peer.name, peer_address=address, reason=str(exc))
            await session.fail(exc)
            return None
        session.send_nowait(self._welcome())
        slot.release()  # authenticated: the next handshake may start
        child = Child(session, purpose, fetch_limit=self.cfg.fetches_per_session)
        self.connections[peer.name] += 1
        try:
            self._attach(child, hello, attach, address)
        except BaseException:
            self._release(peer.name)
            raise
        return child

    def _release(self, name: str) -> None:
        """One of ``name``'s connections ended."""
        self.connections[name] -= 1
        if self.connections[name] <= 0:
            del self.connections[name]

    def _check_connections(self, name: str, purpose: HelloPurpose) -> None:
        """At most ``connections_per_node`` connections per certificate. A
        new session of a node that has one replaces it (a node whose link
        died silently must get back in at once), so it never counts extra;
        any other connection over the cap is refused with the reason."""
        if purpose is HelloPurpose.SESSION and name in self.children:
            return
        cap = self.cfg.connections_per_node
        if self.connections[name] >= cap:
            raise ProtocolError(
                f"{name} already has {self.connections[name]} connections here, "
                f"the most one node may have ([limits] connections_per_node = {cap})",
                ErrorCode.UNAUTHORIZED,
            )

    def _attach(self, child: Child, hello: Hello, attach: Attach, address: str) -> None:
        """A welcomed child is below us now: its route, its claim, its
        presence (a session, not a one-shot query, is also a route)."""
        peer, purpose = child.session.peer, child.purpose
        known = self.db.node(peer.name)
        if purpose is HelloPurpose.SESSION:
            old = self.children.get(peer.name)
            if old is not None:
                old.session.abort("replaced by a new session")
            self.children[peer.name] = child
            self.db.presence_online(
                peer.name, {peer.name: (self.cfg.name, hello.software[:MAX_SOFTWARE])}
            )
            self.hooks.presence_changed([peer.name])
        # Even a one-shot query tells us the node sits right below us; its
        # claim, checked above, is the newest we know of it.
        self.db.upsert_node(
            peer.name,
            peer.role,
            via=peer.name,
            claim=(attach.raw, attach.counter, attach.parent),
            create=self.cfg.role is not Role.SERVER,
        )
        if purpose is HelloPurpose.SESSION or known is None or known.via != peer.name:
            self.hooks.topology_changed([peer.name])
        self.log.info(
            "child.connected", peer=peer.name, role=peer.role, purpose=purpose, peer_address=address
        )
        self.bus.publish(
            ChildConnected(source=self.cfg.name, child=peer.name, role=peer.role, purpose=purpose)
        )

    async def _serve_child(self, child: Child, address: str) -> None:
        """A welcomed child's session, until it ends."""
        session, peer, purpose = child.session, child.session.peer, child.purpose
        reason = "connection ended"
        try:
            if purpose is HelloPurpose.SESSION:
                self.push_revocations(only=child)
                self.push_subtree(child)
            while True:
                msg = await session.recv()
                # A thousand children reporting at once are a thousand readers
                # ready in one turn of the loop: spread them over turns. A
                # PING is answered at once (it keeps the link alive).
                if not isinstance(msg, Ping):
                    await take_turn()
                await self.handlers.handle(child, msg)
                del msg  # not kept while the child idles
        except SessionClosed as exc:
            reason = str(exc)
            self.log.info("child.disconnected", peer=peer.name, reason=reason)
        except ProtocolError as exc:
            # A well-formed message this child may not send: say why, hang up.
            reason = f"refused: {exc}"
            self.log.warning("child.refused", peer=peer.name, peer_address=address, reason=str(exc))
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
                self.pacing.forget(peer.name)
                # The child and everything we knew connected through it.
                self.hooks.presence_changed(self.db.presence_offline(peer.name))
            await session.close()

    def _check_hello(self, peer: Peer, msg: Message) -> HelloPurpose:
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
        if self.cfg.role is Role.SERVER:
            self._check_enrolled(peer)
        return purpose

    def _check_enrolled(self, peer: Peer) -> None:
        """The server's allow-list: only the certificate it issued to a node
        at enrolment (by serial) opens a session; a certificate our CA signed
        for a name never enrolled, or one replaced by a re-issued bundle, is
        refused. A node enrolled before serials were recorded has its
        certificate recorded the first time it shows it."""
        found = self.db.enrolment(peer.name)
        if found is None or not found[0]:
            raise ProtocolError(f"{peer.name} was never enrolled here", ErrorCode.UNAUTHORIZED)
        serial = found[1]
        if serial is None:
            self.db.adopt_certificate(peer.name, peer.serial, peer.key)
            self.log.warning(
                "child.certificate_recorded", peer=peer.name, serial=f"{peer.serial:x}"
            )
        elif serial != str(peer.serial):
            raise ProtocolError(
                f"the certificate {peer.serial:x} is not the one issued to {peer.name} "
                "(it was enrolled again since)",
                ErrorCode.UNAUTHORIZED,
            )

    def _check_attach(self, peer: Peer, hello: Hello) -> Attach:
        """The child's own attach claim in HELLO: signed with the key of the
        certificate it connected with, naming itself, its role and us, not
        in the future, and not older than the newest claim we hold of it."""
        try:
            if not hello.attach:
                raise ClaimError("HELLO carries no attach claim (refused since version 3)")
            claim = verify_attach(hello.attach, self.keys.get(peer.key, keep=False))
            if (claim.node, claim.role, claim.parent) != (peer.name, peer.role, self.cfg.name):
                raise ClaimError(
                    f"the attach claim says {claim.node}/{claim.role} under {claim.parent}"
                )
            check_time(claim.time, time.time(), "attach claim time")
        except (ClaimError, Invalid) as exc:
            raise ProtocolError(f"attach claim refused: {exc}", ErrorCode.UNAUTHORIZED) from None
        known = self.db.claim_index([peer.name]).get(peer.name)
        if known is not None and known.counter is not None and claim.counter < known.counter:
            raise ProtocolError(
                "attach claim refused: older than one already seen from this node",
                ErrorCode.UNAUTHORIZED,
            )
        return claim

    def in_subtree(self, child: str, node: str) -> bool:
        """``routing.in_subtree``, with the route read only when needed."""
        if node == child:
            return True
        row = self.db.node(node)
        return in_subtree(child, node, row.via if row is not None else None)

    # -- pushing jobs down ----------------------------------------------------------
    #
    # Work per event is what the event changed: a pass routes only the jobs
    # whose revision moved since the last pass (``push_changes``), a child
    # that connects gets its own subtree's open work (``push_subtree``), a
    # relay's new routes get only the nodes that moved (``push_nodes``).
    # Everything goes out with ``send_nowait``, so one slow child never holds
    # up the others.

    async def push_changes(self, now: float | None = None) -> None:
        """Route what changed since the last pass: new jobs, retries, cancels,
        jobs received from our parent, and jobs whose time has come. A job
        for a thousand children is a thousand sends: they share the loop's
        turns with everything else (``take_turn``), and passes take turns
        with each other, so a pass that returns has sent what it found."""
        async with self._pushing:
            now = time.time() if now is None else now
            jids, self._rev = self.db.changed_jobs(self._rev)
            jids += self.db.became_due(self._due_mark, now)
            self._due_mark = now
            if not self.children:
                return
            for jid in dict.fromkeys(jids):
                head = self.db.job_head(jid)
                if head is None or (head.at is not None and head.at > now):
                    continue
                for hop, items in by_hop(
                    self.cfg.name, self.db.job_routes(jid), self.children.keys()
                ).items():
                    await take_turn()
                    child = self.children.get(hop)
                    if child is not None:  # else it went meanwhile; it gets its work back
                        self._push(child, head, items, fresh_only=True)

    def push_subtree(self, child: Child) -> None:
        """A child connected: everything open (and every cancel) for it and
        the nodes behind it."""
        self._push_rows(child, self.db.subtree_work(child.name, time.time()), fresh_only=True)

    def push_nodes(self, child: Child, nodes: list[str]) -> None:
        """Nodes newly routed through ``child``: their open work."""
        if nodes:
            self._push_rows(child, self.db.work_of(nodes, time.time()), fresh_only=True)

    def answer_query(self, child: Child, target: str) -> list[str]:
        """Every open job for ``target``, sent to ``child`` even if sent before."""
        rows = [
            r for r in self.db.work_of([target], time.time()) if r[2] is not DestState.CANCELLED
        ]
        return self._push_rows(child, rows, fresh_only=False)

    def push_revocations(self, only: Child | None = None) -> None:
        """Close sessions of revoked nodes; tell relays the whole list."""
        revoked = self.db.revoked()
        targets = [only] if only is not None else list(self.children.values())
        for child in targets:
            if child.name in revoked:
                self.log.warning("child.revoked", peer=child.name)
                child.session.abort("revoked")
            elif child.role is Role.RELAY and child.revoked_sent != revoked:
                child.revoked_sent = revoked
                with contextlib.suppress(SessionClosed):
                    for batch in revoked_batches(revoked):
                        child.session.send_nowait(batch)

    # -- reports from below, applied together ------------------------------------------

    def queue_report(self, child: Child, report: Report) -> None:
        """Apply ``report`` with the others that arrive within
        ``REPORT_LINGER``: one transaction, one fsync for all of them, and
        each is acknowledged after that commit. Thousands of children
        reporting at once cost a commit per batch, not one per report (their
        readers take turns, so one turn holds only a few of them)."""
        self._reports.append((child, report))
        if len(self._reports) == 1:
            self._report_timer = asyncio.get_running_loop().call_later(
                REPORT_LINGER, self._apply_reports
            )

    def _apply_reports(self) -> None:
        self._report_timer = None
        self._apply_batch()
        if self._reports:
            # The rest in the next turn, so one commit never holds the loop long.
            self._report_timer = asyncio.get_running_loop().call_soon(self._apply_reports)

    def _apply_batch(self) -> None:
        batch, self._reports = self._reports[:REPORT_BATCH], self._reports[REPORT_BATCH:]
        try:
            outcomes = self.db.apply_reports([r for _, r in batch], self.hooks.forward_reports)
        except sqlite3.Error as exc:
            # Our own database cannot take them (a full disk): none is
            # acknowledged, so the children keep them and send them again.
            self.log.warning("report.not_recorded", reports=len(batch), reason=str(exc))
            return
        applied = False
        for (child, rep), outcome in zip(batch, outcomes, strict=True):
            if outcome is Applied.APPLIED:
                applied = True
                if DestState(rep.state).final:
                    self.forget(child, rep.job, rep.node)
                self.log.info(
                    "report.applied",
                    job=rep.job,
                    dest=rep.node,
                    state=rep.state,
                    detail=clean_text(rep.detail),
                    package=rep.package,
                )
            elif outcome is Applied.ILLEGAL:
                self.handlers.refused(
                    "report.refused",
                    child,
                    "not a state change the destination lifecycle allows",
                    job=rep.job,
                    dest=rep.node,
                    state=rep.state,
                )
            with contextlib.suppress(SessionClosed):
                child.session.send_nowait(ReportAck(report_id=rep.report_id))
        if applied:
            self.hooks.reports_changed()

    def forget(self, child: Child, job: str, node: str) -> None:
        """``node``'s destination of ``job`` is final: the child session it
        went through need not remember it."""
        child.pushed.pop((job, node), None)

    def _push_rows(
        self, child: Child, rows: list[tuple[str, str, DestState, int]], fresh_only: bool
    ) -> list[str]:
        per_job: dict[str, list[tuple[str, DestState, int]]] = {}
        for jid, node, state, generation in rows:
            per_job.setdefault(jid, []).append((node, state, generation))
        told = []
        for jid, items in per_job.items():
            head = self.db.job_head(jid)
            if head is not None and self._push(child, head, items, fresh_only):
                told.append(jid)
        return told

    def _push(
        self,
        child: Child,
        head: JobHead,
        items: list[tuple[str, DestState, int]],
        fresh_only: bool,
    ) -> bool:
        """Send ``child`` what it must hear about one job; True if it was
        sent a notice. A job made at the child, or behind it, is not sent
        back down."""
        origin = self.db.node(head.origin) if head.origin != self.cfg.name else None
        if made_below(head.origin, child.name, origin.via if origin else None):
            return False
        push, marks = plan_push(head.id, items, child.pushed, fresh_only)
        rate, windows = pace_to_wire(self.db.job_pace(head.id)) if push.notices else (0.0, [])
        try:
            for generation, nodes in push.notices:
                child.session.send_nowait(
                    JobNotice(
                        job=head.id,
                        type=head.type,
                        package=head.package,
                        destinations=nodes,
                        at=head.at,
                        origin=head.origin,
                        generation=generation,
                        manifest=self._envelope(head.id),
                        rate=rate,
                        windows=windows,
                    )
                )
                self.log.info(
                    "job.sent",
                    job=head.id,
                    package=head.package,
                    to=child.name,
                    dests=nodes if len(nodes) <= 10 else f"{len(nodes)} nodes",
                )
            for cancel in cancel_batches(head.id, push.cancels):
                child.session.send_nowait(cancel)
        except SessionClosed:
            return False
        child.pushed.update(marks)
        return bool(push.notices)

    def _envelope(self, jid: str) -> bytes:
        """A job's envelope, read once however many children hear of it."""
        found = self._envelopes.get(jid)
        if found is None:
            found = self.db.envelope(jid) or b""
            self._envelopes[jid] = found
            while len(self._envelopes) > 64:
                self._envelopes.pop(next(iter(self._envelopes)))
        return found


def _set_once(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Slot:
    """One of the handshake slots, released once (whichever comes first:
    the child is welcomed, or its connection ends)."""

    __slots__ = ("_slots",)

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self._slots: asyncio.Semaphore | None = slots

    def release(self) -> None:
        if self._slots is not None:
            self._slots.release()
            self._slots = None


def _format_address(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"[{addr[0]}]:{addr[1]}" if ":" in str(addr[0]) else f"{addr[0]}:{addr[1]}"
    return "unknown"


async def _listen(host: str, port: int) -> socket.socket:
    """A non-blocking listening socket, as asyncio.start_server would make
    it (address reuse on POSIX, the first address the name resolves to)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, type_, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
