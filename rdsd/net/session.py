"""The thin asyncio adapter: one TLS stream, one ``protocol.Connection``.

It moves bytes between the socket and the sans-IO state machine and nothing
else: no policy lives here. The peer's identity comes from its certificate
(``peer``), never from what it says in HELLO; the roles check that the two
agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass

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

READ_SIZE = 1024 * 1024
# Two chunks may wait in a transport: enough to keep the link busy, small
# enough that many slow children cannot add up to much memory.
WRITE_BUFFER = 2 * 1024 * 1024
# What a peer may leave unread before queued control messages count as a
# stalled peer, which is then dropped: chunks in flight (WRITE_BUFFER) plus
# a generous margin of notices, acknowledgements and the like.
CONTROL_BACKLOG = 8 * 1024 * 1024
# Large frames (chunks) go to the transport in slices of this size: the TLS
# layer keeps a buffer as large as the largest single write on each
# connection (measured under uvloop: 1 MiB writes left about 1 MiB per
# connection after the transfer, 64 KiB slices about 64 KiB).
WRITE_SLICE = 64 * 1024


@dataclass(frozen=True)
class Peer:
    """Who is at the other end, from the certificate it proved it holds:
    its name and role, and the certificate's serial and public key (DER),
    against which the peer's own claims are checked."""

    name: str
    role: Role
    serial: int = 0
    key: bytes = b""


class Session:
    """One open connection to a parent or a child."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        side: Side,
        peer: Peer,
        idle_timeout: float,
        observer: TrafficObserver | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        # Let a few chunks queue in the transport so the sender is never idle
        # waiting for a full flush between chunks.
        writer.transport.set_write_buffer_limits(high=WRITE_BUFFER)
        self.conn = Connection(side)
        self.peer = peer
        self.idle_timeout = idle_timeout
        self.closed = False
        self._close_started = False
        self.close_reason = ""
        self._observer = observer
        # Data frames take turns; control frames sent while a sliced frame
        # is half written wait in _held and follow it, so frames never mix.
        self._sending = asyncio.Lock()
        self._partial = False
        self._held: list[bytes | memoryview] = []
        addr = writer.get_extra_info("peername")
        self.log = structlog.get_logger("rdsd.session").bind(
            peer=peer.name,
            peer_address=f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else "unknown",
        )

    @staticmethod
    def identify(writer: asyncio.StreamWriter) -> Peer:
        obj = writer.get_extra_info("ssl_object")
        if not isinstance(obj, ssl.SSLObject):
            raise SecurityError("connection is not TLS")
        der = obj.getpeercert(binary_form=True)
        name, role, serial = peer_identity(der)
        assert der is not None  # peer_identity refuses a missing certificate
        return Peer(name, Role(role), serial, public_key_der(der))

    def send_nowait(self, msg: Message) -> None:
        """Frame and queue ``msg`` without waiting for the peer: what control
        messages (notices, acknowledgements, answers) use, so no handler and
        no pass over many children ever waits on one peer. A peer that has
        left more than CONTROL_BACKLOG unread is dropped as stalled."""
        if self.closed:
            raise SessionClosed(self.close_reason or "session closed")
        transport = self._writer.transport
        if transport.is_closing():
            self._mark_closed("connection closing")
            raise SessionClosed(self.close_reason)
        buffers = self.conn.send(msg)
        if self._observer is not None:
            self._observer.frames_sent(self.peer.name, sum(len(b) for b in buffers))
        if self._partial:
            self._held.extend(buffers)
        else:
            self._writer.writelines(buffers)
        held = sum(len(b) for b in self._held)
        if transport.get_write_buffer_size() + held > CONTROL_BACKLOG:
            self.abort(f"peer left {CONTROL_BACKLOG // (1024 * 1024)} MiB unread")
            raise SessionClosed(self.close_reason)

    async def send(self, msg: Message) -> None:
        """Frame and write ``msg``; waits while the peer is slow to read (how
        package data is paced to what the peer takes)."""
        async with self._sending:
            if self.closed:
                raise SessionClosed(self.close_reason or "session closed")
            buffers = self.conn.send(msg)
            if self._observer is not None:
                self._observer.frames_sent(self.peer.name, sum(len(b) for b in buffers))
            try:
                if sum(len(b) for b in buffers) <= WRITE_SLICE:
                    self._writer.writelines(buffers)
                    await self._drain()
                else:
                    await self._write_sliced(buffers)
            finally:
                self._partial = False
                held, self._held = self._held, []
                if held and not self.closed:
                    self._writer.writelines(held)

    async def _write_sliced(self, buffers: list[bytes | memoryview]) -> None:
        self._partial = True
        for buf in buffers:
            view = memoryview(buf)
            for start in range(0, len(view), WRITE_SLICE):
                self._writer.write(view[start : start + WRITE_SLICE])
                await self._drain()

    async def _drain(self) -> None:
        """Wait until the transport takes more; a peer that reads nothing
        for the idle timeout is dropped."""
        try:
            async with asyncio.timeout(self.idle_timeout):
                await self._writer.drain()
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
            try:
                async with asyncio.timeout(limit):
                    data = await self._reader.read(READ_SIZE)
            except TimeoutError:
                await self.fail(ProtocolError(f"no data for {limit:.0f}s", ErrorCode.TIMEOUT))
                raise SessionClosed(self.close_reason) from None
            except (ConnectionError, OSError, ssl.SSLError) as exc:
                self._mark_closed(f"read failed: {exc}")
                raise SessionClosed(self.close_reason) from None
            self.conn.receive_data(data)

    async def fail(self, exc: ProtocolError) -> None:
        """Tell the peer why we hang up, then hang up. A peer that broke
        the wire rules before its session is established is dropped after
        the ERROR rather than closed gracefully."""
        self.log.warning("session.error", reason=str(exc), code=int(exc.code))
        established = self.conn.state is State.OPEN
        if not self.closed and not self._partial:  # never inside a half-written frame
            with contextlib.suppress(Exception):
                self._writer.writelines(self.conn.send_error(exc))
        if isinstance(exc, RemoteProtocolError) and not established:
            # A graceful TLS close reads and decrypts whatever the peer keeps
            # pouring in, for up to 2 s, while it holds a handshake slot
            # (measured: 150 peers pouring in a 17 MiB frame took the server
            # to 170 MB with the graceful close, under 100 MB without). A
            # HELLO refused for what it says still gets the graceful close.
            self.abort(str(exc))
        else:
            await self.close(str(exc))

    async def goodbye(self, reason: str = "") -> None:
        if not self.closed and not self._partial:  # never inside a half-written frame
            with contextlib.suppress(Exception):
                self._writer.writelines(self.conn.send(Goodbye(reason=reason)))
        await self.close(reason or "goodbye")

    async def close(self, reason: str = "") -> None:
        """Close once; later calls return at once. The wait for the peer's
        side of the TLS close is bounded and shielded, so a peer that never
        answers cannot leave the stream's shared close future cancelled."""
        self._mark_closed(reason)
        if self._close_started:
            return
        self._close_started = True
        try:
            self._writer.close()
            await asyncio.wait_for(asyncio.shield(self._writer.wait_closed()), 2)
        except Exception as exc:
            # The stream keeps this error (a reset, say) in its close future;
            # its traceback holds this frame and so the session and the
            # stream: a cycle that kept each reset connection's TLS state
            # until the next full garbage collection. Drop the traceback.
            exc.__traceback__ = None

    def abort(self, reason: str) -> None:
        """Drop the connection now (revocation, shutdown)."""
        self._mark_closed(reason)
        transport = self._writer.transport
        transport.abort()

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
) -> tuple[Session, Welcome]:
    """Connect to a parent, check it is a server or relay of our deployment,
    and exchange HELLO/WELCOME within ``timeout``. ``hello`` may be made
    from the parent's identity (a child's attach claim names its parent)."""
    async with asyncio.timeout(timeout):
        try:
            reader, writer = await asyncio.open_connection(host, port, ssl=ctx, limit=READ_SIZE)
        except ssl.SSLCertVerificationError:
            # OpenSSL's words ("self-signed certificate in certificate chain")
            # name the mechanism; a person needs to know which side is wrong.
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise SecurityError(
                f"the parent at {where} belongs to another deployment: its certificate is "
                "not signed by this node's CA (check --parent, or enrol this node there)"
            ) from None
        try:
            peer = Session.identify(writer)
            if peer.role not in (Role.SERVER, Role.RELAY):
                raise SecurityError(f"parent {peer.name} presents a {peer.role} certificate")
        except SecurityError:
            writer.close()
            raise
        session = Session(reader, writer, Side.CHILD, peer, idle_timeout, observer)
        await session.send(hello if isinstance(hello, Hello) else hello(peer))
        msg = await session.recv(timeout)
    if not isinstance(msg, Welcome):
        await session.close("unexpected answer to HELLO")
        raise SessionClosed(f"parent answered HELLO with {msg.TYPE.name}")
    if msg.node != peer.name or msg.role != peer.role:
        await session.close("parent identity mismatch")
        raise SecurityError(f"parent says it is {msg.node}/{msg.role}, certificate says {peer}")
    return session, msg
