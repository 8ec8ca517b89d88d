"""The thin asyncio adapter: one TLS stream, one ``protocol.Connection``.

It moves bytes between the socket and the sans-IO state machine and nothing
else: no policy lives here. Receiving is a ``BufferedProtocol`` (``Stream``):
the TLS layer decrypts straight into the buffer the connection hands out,
which during a chunk is the chunk's own payload buffer, so a received byte
is not copied again in user space before it is hashed and written. Reading
pauses while more than ``READ_AHEAD`` bytes wait for the session's reader.
The peer's identity comes from its certificate (``peer``), never from what
it says in HELLO; the roles check that the two agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import structlog

from protocol import (
    NEED_DATA,
    Connection,
    ConnectionClosed,
    Error,
    ErrorCode,
    Goodbye,
    Hello,
    Message,
    ProtocolError,
    RemoteProtocolError,
    Side,
    State,
    Welcome,
)

from ..claims import public_key_der
from ..domain import Role
from ..errors import PeerError, SecurityError, SessionClosed
from ..security import peer_identity
from .observe import TrafficObserver

#: Received bytes that may wait for the session's reader (beyond the payload
#: being received) before the transport stops reading: backpressure, and
#: the bound on what one peer can make us hold.
READ_AHEAD = 2 * 1024 * 1024
# Large frames (chunks) go to the transport in slices of this size: the TLS
# layer keeps a buffer as large as the largest single write on each
# connection (measured under uvloop: 1 MiB writes left about 1 MiB per
# connection after the transfer, 64 KiB slices about 64 KiB).
WRITE_SLICE = 64 * 1024
#: What may wait in a session's TLS layer (encrypted bytes the socket has
#: not taken, plus bytes not yet encrypted) before a sending task waits for
#: the peer: the kernel's socket buffer keeps the link busy, so this only
#: has to cover one slice. It bounds memory, and not only while it waits:
#: the TLS layer's outgoing buffer (OpenSSL's memory BIO) grows to the most
#: it ever held and never shrinks for the connection's life. With 2 MiB
#: here, a relay serving a 1 MiB package to 1,000 children whose sockets
#: filled kept about 1 MiB per such child after the job (measured: relays
#: at 550-730 MiB with 1,000 clients each, almost all of it in those
#: buffers); now a session holds at most this plus one slice.
WRITE_BUFFER = 16 * 1024
# What a peer may leave unread before queued control messages count as a
# stalled peer, which is then dropped: a slice in flight plus a generous
# margin of notices, acknowledgements and the like.
CONTROL_BACKLOG = 8 * 1024 * 1024


class Stream(asyncio.BufferedProtocol):
    """The transport's protocol for one connection: hands the connection's
    receive buffers to the TLS layer, wakes the session's reader, pauses
    reading while the reader is behind, and keeps flow control for writes.

    An idle connection is most of what a relay holds for thousands of
    children, so this holds nothing while nobody waits: the reader's waiter
    and the close future exist only while someone waits on them (an
    ``asyncio.Event`` and an eager future cost about 1 KiB per connection).
    """

    __slots__ = (
        "__weakref__",  # tests watch that closed connections are freed
        "_drained",
        "_lost",
        "_lost_waiter",
        "_reading_paused",
        "_waiter",
        "_woken",
        "_write_paused",
        "conn",
        "lost_reason",
        "read_ahead",
        "transport",
    )

    def __init__(self, side: Side, read_ahead: int = READ_AHEAD) -> None:
        self.conn = Connection(side)
        self.read_ahead = read_ahead
        self.transport: asyncio.Transport | None = None
        # Bytes (or the end) arrived that the reader has not looked at yet;
        # the reader's waiter, while it waits (True: woken, False: timed out).
        self._woken = False
        self._waiter: asyncio.Future[bool] | None = None
        self._reading_paused = False
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._lost = False
        self._lost_waiter: asyncio.Future[None] | None = None
        self.lost_reason: Exception | None = None

    # -- asyncio.BufferedProtocol ---------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's do not subclass asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.conn.buffer_updated(nbytes)
        self._wake()
        if self.conn.unread > self.read_ahead and not self._reading_paused:
            assert self.transport is not None
            self._reading_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.conn.receive_data(b"")
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_reason = exc
        self._lost = True
        waiter = self._lost_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self.conn.receive_data(b"")
        self._wake()
        self._wake_writer(exc)
        # uvloop's TLS protocol keeps this protocol's bound methods and the
        # transport keeps that protocol: with ours keeping the transport, a
        # cycle the garbage collector cannot see into (Cython objects), which
        # held every closed connection's buffers for good. Drop our side.
        self.transport = None

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writer(None)

    # -- used by Session ------------------------------------------------------

    def lost_future(self) -> asyncio.Future[None]:
        """Done once the connection is gone: one future shared by every
        waiter (shield it before a bounded wait), made only when asked."""
        waiter = self._lost_waiter
        if waiter is None:
            waiter = self._lost_waiter = asyncio.get_running_loop().create_future()
            if self._lost:
                waiter.set_result(None)
        return waiter

    def data_waiter(self) -> asyncio.Future[bool] | None:
        """None if new bytes (or the end) arrived since the reader last
        looked; else a future that becomes True when they do (``time_out``
        makes it False). Reading resumes first if it was paused."""
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        if self._woken:
            self._woken = False
            return None
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        return waiter

    def consumed_wake(self) -> None:
        """The reader, woken, looks at everything that arrived so far."""
        self._woken = False

    @staticmethod
    def time_out(waiter: asyncio.Future[bool]) -> None:
        """The reader waited long enough (a timer's callback)."""
        if not waiter.done():
            waiter.set_result(False)

    def _wake(self) -> None:
        self._woken = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    @property
    def writable(self) -> bool:
        """The transport takes more now: no need to wait."""
        return not self._write_paused and not self._lost

    async def drain(self) -> None:
        """Until the transport takes more (or the connection is gone)."""
        if self._lost:
            raise ConnectionResetError(str(self.lost_reason or "connection lost"))
        if not self._write_paused:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._drained = waiter
        await waiter

    def _wake_writer(self, exc: Exception | None) -> None:
        waiter, self._drained = self._drained, None
        if waiter is not None and not waiter.done():
            if exc is None and not self._lost:
                waiter.set_result(None)
            else:
                waiter.set_exception(ConnectionResetError(str(exc or "connection lost")))


@dataclass(frozen=True)
class Peer:
    """Who is at the other end, from the certificate it proved it holds:
    its name and role, and the certificate's serial and public key (DER),
    against which the peer's own claims are checked."""

    name: str
    role: Role
    serial: int = 0
    key: bytes = b""

    @classmethod
    def of_certificate(cls, der: bytes | None) -> Peer:
        """The peer a verified TLS handshake proved (``getpeercert(True)``)."""
        name, role, serial = peer_identity(der)
        assert der is not None  # peer_identity refuses a missing certificate
        return cls(name, Role(role), serial, public_key_der(der))


class Session:
    """One open connection to a parent or a child.

    What only some sessions ever use is made when first used: the send lock
    (only for data frames), the held control frames (only while a sliced
    frame is half written) and the bound logger (only when something goes
    wrong); an idle session holds none of them."""

    __slots__ = (
        "__weakref__",  # tests watch that closed connections are freed
        "_address",
        "_close_started",
        "_held",
        "_observer",
        "_partial",
        "_sending",
        "_stream",
        "close_reason",
        "closed",
        "conn",
        "idle_timeout",
        "peer",
        "transport",
    )

    def __init__(
        self,
        stream: Stream,
        peer: Peer,
        idle_timeout: float,
        observer: TrafficObserver | None = None,
    ) -> None:
        assert stream.transport is not None, "the stream is not connected"
        self._stream = stream
        self.transport: asyncio.Transport = stream.transport
        # The socket's own buffer keeps the link busy between slices; what
        # waits above it in the TLS layer stays within a slice (WRITE_BUFFER).
        self.transport.set_write_buffer_limits(high=WRITE_BUFFER)
        self.conn = stream.conn
        self.peer = peer
        self.idle_timeout = idle_timeout
        self.closed = False
        self._close_started = False
        self.close_reason = ""
        self._observer = observer
        # Data frames take turns; control frames sent while a sliced frame
        # is half written wait in _held and follow it, so frames never mix.
        self._sending: asyncio.Lock | None = None
        self._partial = False
        self._held: list[bytes | memoryview] | None = None
        addr = self.transport.get_extra_info("peername")
        self._address = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else "unknown"

    @property
    def log(self) -> structlog.typing.FilteringBoundLogger:
        """This session's logger (bound when something is logged, not for
        every session up front)."""
        logger: structlog.typing.FilteringBoundLogger = structlog.get_logger("rdsd.session").bind(
            peer=self.peer.name, peer_address=self._address
        )
        return logger

    @property
    def writes_paused(self) -> bool:
        """The TLS layer holds WRITE_BUFFER or more that the socket has not
        taken: a send waits until the peer reads."""
        return not self._stream.writable and not self.closed

    @staticmethod
    def identify(transport: asyncio.BaseTransport) -> Peer:
        obj = transport.get_extra_info("ssl_object")
        if not isinstance(obj, ssl.SSLObject):
            raise SecurityError("connection is not TLS")
        return Peer.of_certificate(obj.getpeercert(binary_form=True))

    def send_nowait(self, msg: Message) -> None:
        """Frame and queue ``msg`` without waiting for the peer: what control
        messages (notices, acknowledgements, answers) use, so no handler and
        no pass over many children ever waits on one peer. A peer that has
        left more than CONTROL_BACKLOG unread is dropped as stalled."""
        if self.closed:
            raise SessionClosed(self.close_reason or "session closed")
        transport = self.transport
        if transport.is_closing():
            self._mark_closed("connection closing")
            raise SessionClosed(self.close_reason)
        buffers = self.conn.send(msg)
        if self._observer is not None:
            self._observer.frames_sent(self.peer.name, sum(len(b) for b in buffers))
        if self._partial:
            if self._held is None:
                self._held = []
            self._held.extend(buffers)
        else:
            self.transport.writelines(buffers)
        held = sum(len(b) for b in self._held) if self._held else 0
        if transport.get_write_buffer_size() + held > CONTROL_BACKLOG:
            self.abort(f"peer left {CONTROL_BACKLOG // (1024 * 1024)} MiB unread")
            raise SessionClosed(self.close_reason)

    async def send(self, msg: Message) -> None:
        """Frame and write ``msg``; waits while the peer is slow to read (how
        package data is paced to what the peer takes)."""
        if self._sending is None:
            self._sending = asyncio.Lock()
        async with self._sending:
            if self.closed:
                raise SessionClosed(self.close_reason or "session closed")
            buffers = self.conn.send(msg)
            if self._observer is not None:
                self._observer.frames_sent(self.peer.name, sum(len(b) for b in buffers))
            try:
                if sum(len(b) for b in buffers) <= WRITE_SLICE:
                    self.transport.writelines(buffers)
                    await self._drain()
                else:
                    await self._write_sliced(buffers)
            finally:
                self._partial = False
                held, self._held = self._held, None
                if held and not self.closed:
                    self.transport.writelines(held)

    async def _write_sliced(self, buffers: list[bytes | memoryview]) -> None:
        """Write one frame in slices, waiting for the peer between them. A
        frame once begun is always finished: cancelled between slices (a
        FETCH_CANCEL, a stop), the rest goes to the transport at once, since
        a half-written frame would turn the next frame into payload."""
        self._partial = True
        views = [memoryview(b) for b in buffers]
        for i, view in enumerate(views):
            for start in range(0, len(view), WRITE_SLICE):
                self.transport.write(view[start : start + WRITE_SLICE])
                try:
                    await self._drain()
                except asyncio.CancelledError:
                    if not self.closed:
                        rest = [view[start + WRITE_SLICE :], *views[i + 1 :]]
                        self.transport.writelines([r for r in rest if len(r)])
                    raise

    async def _drain(self) -> None:
        """Wait until the transport takes more; a peer that reads nothing
        for the idle timeout is dropped."""
        if self._stream.writable:
            return  # the common case, per slice: no timer to arm
        try:
            async with asyncio.timeout(self.idle_timeout):
                await self._stream.drain()
        except TimeoutError:
            # The peer stopped reading: free what we hold for it.
            self.abort(f"peer read nothing for {self.idle_timeout:.0f}s")
            raise SessionClosed(self.close_reason) from None
        except (ConnectionError, OSError) as exc:
            self._mark_closed(f"write failed: {exc}")
            raise SessionClosed(self.close_reason) from None

    async def recv(self, timeout: float | None = None) -> Message:
        """The next message from the peer. Raises SessionClosed on EOF,
        protocol violation (after telling the peer why) or idle timeout."""
        limit = self.idle_timeout if timeout is None else timeout
        while True:
            try:
                event = self.conn.next_event()
            except RemoteProtocolError as exc:
                await self.fail(exc)
                raise SessionClosed(f"protocol error: {exc}") from None
            if isinstance(event, Error):
                await self.close(f"peer error: {event.reason}")
                raise PeerError(event.code, event.reason)
            if isinstance(event, Goodbye):
                await self.close(f"peer said goodbye: {event.reason}")
                raise SessionClosed(self.close_reason)
            if isinstance(event, Message):
                return event
            if isinstance(event, ConnectionClosed):
                self._mark_closed("peer closed" if event.graceful else "peer disconnected")
                raise SessionClosed(self.close_reason)
            assert event is NEED_DATA
            if self.closed:
                raise SessionClosed(self.close_reason)
            waiter = self._stream.data_waiter()
            if waiter is None:
                continue  # bytes arrived meanwhile
            # A plain timer on the waiter, not asyncio.timeout(): no timeout
            # object, no cancellation of the task, for every read of every
            # idle session.
            timer = asyncio.get_running_loop().call_later(limit, Stream.time_out, waiter)
            try:
                woken = await waiter
            finally:
                timer.cancel()
            self._stream.consumed_wake()
            if not woken:
                # A peer silent for the whole timeout will not answer the TLS
                # close either: do not wait for it (the link comes back sooner).
                await self.fail(
                    ProtocolError(f"no data for {limit:.0f}s", ErrorCode.TIMEOUT), wait=False
                )
                raise SessionClosed(self.close_reason)

    async def fail(self, exc: ProtocolError, wait: bool = True) -> None:
        """Tell the peer why we hang up, then hang up (``wait``: for the
        peer's side of the TLS close, bounded). A peer that broke the wire
        rules before its session is established is dropped after the ERROR
        rather than closed gracefully."""
        self.log.warning("session.error", reason=str(exc), code=int(exc.code))
        established = self.conn.state is State.OPEN
        if not self.closed and not self._partial:  # never inside a half-written frame
            with contextlib.suppress(Exception):
                self.transport.writelines(self.conn.send_error(exc))
        if isinstance(exc, RemoteProtocolError) and not established:
            # A graceful TLS close reads and decrypts whatever the peer keeps
            # pouring in, for up to 2 s, while it holds a handshake slot
            # (measured: 150 peers pouring in a 17 MiB frame took the server
            # to 170 MB with the graceful close, under 100 MB without). A
            # HELLO refused for what it says still gets the graceful close.
            self.abort(str(exc))
        else:
            await self.close(str(exc), wait)

    async def goodbye(self, reason: str = "") -> None:
        if not self.closed and not self._partial:  # never inside a half-written frame
            with contextlib.suppress(Exception):
                self.transport.writelines(self.conn.send(Goodbye(reason=reason)))
        await self.close(reason or "goodbye")

    async def close(self, reason: str = "", wait: bool = True) -> None:
        """Close once; later calls return at once. The wait for the peer's
        side of the TLS close is bounded and shielded, so a peer that never
        answers cannot leave the stream's shared close future cancelled;
        without ``wait`` the close goes on in the background (bounded by the
        TLS shutdown timeout)."""
        self._mark_closed(reason)
        if self._close_started:
            return
        self._close_started = True
        try:
            self.transport.close()
            if wait:
                await asyncio.wait_for(asyncio.shield(self._stream.lost_future()), 2)
        except Exception as exc:
            # A kept traceback would hold this frame and so the session and
            # its TLS state until the next full garbage collection.
            exc.__traceback__ = None

    def abort(self, reason: str) -> None:
        """Drop the connection now (revocation, shutdown)."""
        self._mark_closed(reason)
        self.transport.abort()

    def _mark_closed(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.close_reason = reason


async def open_child_session(
    host: str,
    port: int,
    ctx: ssl.SSLContext,
    hello: Hello | Callable[[Peer], Hello],
    timeout: float,
    idle_timeout: float,
    observer: TrafficObserver | None = None,
    stream: Callable[[], Stream] | None = None,
) -> tuple[Session, Welcome]:
    """Connect to a parent, check it is a server or relay of our deployment,
    and exchange HELLO/WELCOME within ``timeout``. ``hello`` may be made
    from the parent's identity (a child's attach claim names its parent).
    ``stream`` makes the connection's protocol (a ``Stream`` of the child's
    side unless given: the fleet simulator's clients receive differently)."""
    loop = asyncio.get_running_loop()
    make = stream or (lambda: Stream(Side.CHILD))
    async with asyncio.timeout(timeout):
        try:
            _, link = await loop.create_connection(make, host, port, ssl=ctx)
        except ssl.SSLCertVerificationError:
            # OpenSSL's words ("self-signed certificate in certificate chain")
            # name the mechanism; a person needs to know which side is wrong.
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise SecurityError(
                f"the parent at {where} belongs to another deployment: its certificate is "
                "not signed by this node's CA (check --parent, or enrol this node there)"
            ) from None
        assert link.transport is not None
        try:
            peer = Session.identify(link.transport)
            if peer.role not in (Role.SERVER, Role.RELAY):
                raise SecurityError(f"parent {peer.name} presents a {peer.role} certificate")
        except SecurityError:
            link.transport.close()
            raise
        session = Session(link, peer, idle_timeout, observer)
        await session.send(hello if isinstance(hello, Hello) else hello(peer))
        msg = await session.recv(timeout)
    if not isinstance(msg, Welcome):
        await session.close("unexpected answer to HELLO")
        raise SessionClosed(f"parent answered HELLO with {msg.TYPE.name}")
    if msg.node != peer.name or msg.role != peer.role:
        await session.close("parent identity mismatch")
        raise SecurityError(f"parent says it is {msg.node}/{msg.role}, certificate says {peer}")
    return session, msg
