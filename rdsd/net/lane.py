"""Lanes: one package fetch on a connection of its own, moved by threads.

A session's bytes go through the event loop: TLS runs in the loop's one
thread and every read and write is a Python step there. That suits control
messages and small packages and is the ceiling for large ones: while the
loop decrypts, hashing and writing wait for it, and a relay forwarding
decrypts and encrypts every byte in that same thread.

A lane is a second connection from a child to its parent's own address for
one fetch (SPEC section 6a). The child sends ``LANE_MAGIC`` in the clear,
then both sides do mutual TLS as for a session, HELLO (purpose ``lane``,
with the child's attach claim) and WELCOME, one FETCH, and the parent's
CHUNKs and FETCH_END (or FETCH_FAIL). A thread owns each end with a
blocking socket: the parent's reads each chunk with ``preadv`` into one
reused buffer and writes it with blocking TLS writes; the child's decrypts
with ``recv_into`` straight into the chunk's own payload buffer, and the
download's writer thread hashes and writes that chunk while the next one
arrives. TLS, SHA-256 and the system calls all release the GIL, so both
cores work and the event loop stays free for everyone else's messages.

What the event loop owns is asked for from the threads, never touched:
the parent's checks (certificate allow-list, attach claim, the job that
permits the fetch), serve slots and pacing run on the loop through
``run_coroutine_threadsafe``; a written chunk is handed to the loop's
``Download.settled`` with ``call_soon_threadsafe``, which is what moves the
verified offset, feeds cut-through and wakes the extractor. A lane that
cannot be opened (``LaneRefused``) leaves the fetch to the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import structlog

from protocol import (
    LANE_MAGIC,
    NEED_DATA,
    Chunk,
    Connection,
    ConnectionClosed,
    Error,
    Fetch,
    FetchEnd,
    FetchFail,
    Goodbye,
    Hello,
    Message,
    ProtocolError,
    Side,
    Welcome,
)

from ..errors import (
    CorruptChunk,
    ExpiredPackage,
    LaneRefused,
    RdsdError,
    StoreError,
    TransferFailed,
    TransferPaused,
)
from ..packages.download import Download
from ..packages.store import Reading
from .pace import Pacer
from .session import Peer
from .transfer import CHUNK_WAIT, store_failure

T = TypeVar("T")
log = structlog.get_logger("rdsd.lane")
#: How much a lane's receiving thread asks to read at once between payloads
#: (a TLS record is at most 16 KiB; a chunk's payload is read in place).
RECV_HINT = 256 * 1024
#: Chunks a lane's receiving thread leaves with the writer thread while it
#: receives the next: hashing and writing a chunk is quicker than receiving
#: it, so two keep the writer busy; each is a chunk buffer held.
LANE_IN_FLIGHT = 2
#: What a lane's sending thread reads and sends at once of a chunk it need
#: not check (a package verified at rest).
SEND_PIECE = 256 * 1024
#: Longest a lane's thread waits for the event loop to answer a question
#: (a check, a serve slot, the pacer): beyond it the lane gives up.
LOOP_WAIT = CHUNK_WAIT


def start_thread(fn: Callable[[], T], name: str) -> asyncio.Future[T]:
    """Run ``fn`` in a thread of its own; its outcome comes back as a future
    of the running loop. A lane's thread blocks for as long as its transfer
    lasts, so it does not take a worker of a shared pool."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def run() -> None:
        try:
            result: Any = fn()
            ok = True
        except BaseException as exc:  # handed to the loop, raised there
            result, ok = exc, False
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(settle, ok, result)

    threading.Thread(target=run, name=name, daemon=True).start()
    return fut


class _Wire:
    """A blocking TLS socket and its sans-IO connection, for one thread."""

    def __init__(self, tls: ssl.SSLSocket, conn: Connection) -> None:
        self.tls = tls
        self.conn = conn

    def send(self, msg: Message) -> None:
        for buf in self.conn.send(msg):
            self.tls.sendall(buf)

    def refuse(self, exc: ProtocolError) -> None:
        with contextlib.suppress(OSError):
            for buf in self.conn.send_error(exc):
                self.tls.sendall(buf)

    def next(self) -> Message | ConnectionClosed:
        """The next message (or the end), reading as needed. Payloads are
        received in place: ``recv_into`` the buffer the connection hands
        out, which during a CHUNK is the chunk's own, filled whole before
        the connection is stepped again (one step per chunk, not per 16 KiB
        record)."""
        conn = self.conn
        while True:
            event = conn.next_event()
            if event is not NEED_DATA:
                assert isinstance(event, Message | ConnectionClosed)
                return event
            view = conn.get_buffer(RECV_HINT)
            if conn.filling_payload:
                # The rest of a chunk's own buffer: fill it whole, a TLS
                # record per call, and only then step the connection.
                n = 0
                while n < len(view) and (got := self.tls.recv_into(view[n:])):
                    n += got
            else:
                n = self.tls.recv_into(view)
            if n:
                conn.buffer_updated(n)
            else:
                conn.receive_data(b"")


class BufferPool:
    """Chunk buffers a lane receives into, used again once a chunk is
    written: a fresh 1 MiB buffer per chunk cost a mapping, 256 page faults
    and its zeroing, a fifth of a receiving thread's time."""

    def __init__(self, size: int, keep: int) -> None:
        self.size = size
        self.keep = keep
        self._free: deque[bytearray] = deque()  # appends and pops are atomic

    def get(self, n: int) -> bytearray:
        if n == self.size:
            with contextlib.suppress(IndexError):
                return self._free.pop()
        return bytearray(n)

    def give(self, data: bytes | memoryview) -> None:
        """``data`` (a chunk's view of a buffer from ``get``) is no longer
        used by anyone."""
        buf = data.obj if isinstance(data, memoryview) else None
        if isinstance(buf, bytearray) and len(buf) == self.size and len(self._free) < self.keep:
            self._free.append(buf)


def _peer_of(tls: ssl.SSLSocket) -> Peer:
    return Peer.of_certificate(tls.getpeercert(binary_form=True))


# -- the parent's end ---------------------------------------------------------


@dataclass
class LaneServe:
    """What the loop set up for one fetch on a lane: what to read and how
    fast to send it. Given back to the loop's ``LaneHost.serve_ended``."""

    reading: Reading
    pacer: Pacer
    fetch: Fetch


class LaneHost(Protocol):
    """The parent half's side of a lane, called on the event loop."""

    def admit_lane(self, peer: Peer, hello: Message) -> None:
        """Check the HELLO as for a session (raises ProtocolError), and
        count the connection against the node's cap."""

    def lane_closed(self, peer: Peer) -> None:
        """The admitted lane ended: it no longer counts."""

    async def open_lane_fetch(self, peer: Peer, fetch: Fetch) -> LaneServe | str:
        """The fetch as the session would serve it: a refusal's reason, or
        what to read (holding a serve slot until ``serve_ended``)."""

    def serve_ended(self, peer: Peer, serve: LaneServe, sent: int, whole: bool) -> None:
        """Give back the serve slot and the reading; ``whole``: every chunk
        from byte zero went."""

    def serve_corrupt(self, package: str, offset: int) -> None:
        """A chunk failed its check at rest: set the package aside."""

    def chunk_sent(self, peer: Peer, nbytes: int) -> None:
        """``nbytes`` of package data went to ``peer``."""

    def handshake_failed(self, address: str, exc: Exception) -> None:
        """A lane failed before its HELLO (TLS): logged as a session's is."""


class ParentLane:
    """The parent's end of one lane, run in its own thread (``run``)."""

    def __init__(
        self,
        host: LaneHost,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        ctx: ssl.SSLContext,
        welcome: Welcome,
        deadline: float,
        idle_timeout: float,
        admitted: Callable[[], None],
    ) -> None:
        self.host = host
        self.loop = loop
        self.sock = sock
        self.ctx = ctx
        self.welcome = welcome
        self.deadline = deadline  # time.monotonic() by which WELCOME must go
        self.idle_timeout = idle_timeout
        self.admitted = admitted  # on the loop: the handshake slot goes back
        self.address = _address(sock)
        self._asking: Future[Any] | None = None
        self._stopping = False
        self.log = log.bind(node=welcome.node, peer_address=self.address)

    def abort(self) -> None:
        """From the loop: end the lane now (shutting down). Blocking calls
        in the thread fail at once; a question to the loop is cancelled."""
        self._stopping = True
        asking = self._asking
        if asking is not None:
            asking.cancel()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _ask(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its answer."""
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        self._asking = fut
        try:
            if self._stopping:
                fut.cancel()
            return fut.result(LOOP_WAIT)
        finally:
            self._asking = None

    def _on_loop(self, fn: Callable[..., object], *args: object) -> None:
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(fn, *args)

    def run(self) -> None:
        """The lane, start to end. A peer that goes away is logged here;
        anything else is raised to the loop, which logs it."""
        try:
            self._run()
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            if not self._stopping:
                self.log.info("lane.ended", reason=str(exc) or type(exc).__name__)
        finally:
            self.sock.close()

    def _run(self) -> None:
        self.sock.settimeout(max(0.01, self.deadline - time.monotonic()))
        try:
            tls = self.ctx.wrap_socket(self.sock, server_side=True)
            peer = _peer_of(tls)
        except (OSError, ValueError, RdsdError) as exc:
            self._on_loop(self.host.handshake_failed, self.address, exc)
            return
        wire = _Wire(tls, Connection(Side.PARENT))
        log = self.log.bind(peer=peer.name)
        try:
            hello = wire.next()
            if not isinstance(hello, Hello):
                raise ProtocolError("expected HELLO on a lane")
            self._ask(_call(self.host.admit_lane, peer, hello))
        except ProtocolError as exc:
            log.warning("child.refused", reason=str(exc), lane=True)
            wire.refuse(exc)
            return
        try:
            wire.send(self.welcome)
            self._on_loop(self.admitted)
            tls.settimeout(self.idle_timeout)
            self._serve(wire, peer, log)
        finally:
            self._on_loop(self.host.lane_closed, peer)

    def _serve(self, wire: _Wire, peer: Peer, log: Any) -> None:
        msg = wire.next()
        if isinstance(msg, ConnectionClosed | Goodbye | Error):
            return
        if not isinstance(msg, Fetch):
            exc = ProtocolError(f"a lane carries one FETCH, not {msg.TYPE.name}")
            log.warning("child.refused", reason=str(exc), lane=True)
            wire.refuse(exc)
            return
        fetch = msg
        log = log.bind(package=fetch.package)
        answer = self._ask(self.host.open_lane_fetch(peer, fetch))
        if isinstance(answer, str):
            wire.send(FetchFail(fetch_id=fetch.fetch_id, reason=answer))
            return
        sent, whole = 0, False
        try:
            try:
                sent = self._stream(wire, peer, answer)
            except CorruptChunk as exc:
                log.error("serve.corrupt", offset=exc.offset, lane=True)
                self._on_loop(self.host.serve_corrupt, fetch.package, exc.offset)
                wire.send(FetchFail(fetch_id=fetch.fetch_id, reason=str(exc)))
                return
            except (StoreError, ExpiredPackage, TimeoutError) as exc:
                reason = str(exc) or type(exc).__name__
                log.warning("serve.failed", reason=reason, lane=True)
                wire.send(FetchFail(fetch_id=fetch.fetch_id, reason=reason))
                return
            whole = fetch.offset == 0
            wire.send(FetchEnd(fetch_id=fetch.fetch_id, size=fetch.offset + sent))
            log.info("serve.done", offset=fetch.offset, bytes=sent, lane=True)
            # The child closes once it has FETCH_END; wait for that (bounded)
            # so the last bytes are not cut off by our close.
            with contextlib.suppress(OSError, ProtocolError):
                wire.next()
        finally:
            self._on_loop(self.host.serve_ended, peer, answer, sent, whole)

    def _stream(self, wire: _Wire, peer: Peer, serve: LaneServe) -> int:
        """Send every chunk from the fetch's offset; bytes sent. A chunk of
        a package verified at rest goes out in pieces as they are read (so
        many children served at once hold a piece each, not a chunk each);
        one that must be checked first is read and hashed whole."""
        reading, fetch = serve.reading, serve.fetch
        m = reading.manifest
        piece = bytearray(min(SEND_PIECE, m.chunk_size))
        whole: bytearray | None = None
        pos = fetch.offset
        while pos < m.size:
            if reading.check:
                whole = whole or bytearray(m.chunk_size)
                data = reading.read(pos, whole, CHUNK_WAIT)
                self._pace(serve, len(data))
                wire.send(Chunk(fetch_id=fetch.fetch_id, offset=pos, data=data))
                length = len(data)
            else:
                length = reading.ready(pos, CHUNK_WAIT)
                self._pace(serve, length)
                wire.tls.sendall(wire.conn.send_chunk_start(fetch.fetch_id, pos, length))
                self._send_pieces(wire, reading, piece, pos, length)
            self._on_loop(self.host.chunk_sent, peer, length)
            pos += length
        return pos - fetch.offset

    def _pace(self, serve: LaneServe, nbytes: int) -> None:
        if serve.pacer.rate > 0:
            self._ask(serve.pacer.take(nbytes))

    def _send_pieces(
        self, wire: _Wire, reading: Reading, piece: bytearray, pos: int, length: int
    ) -> None:
        """The payload of a chunk whose frame has begun. The frame must be
        finished or the lane dropped: a short read cannot become FETCH_FAIL
        in the middle of a frame, so it ends the lane (the child asks again)."""
        end = pos + length
        at = pos
        while at < end:
            view = memoryview(piece)[: min(len(piece), end - at)]
            try:
                reading.read_into(view, at)
            except (CorruptChunk, OSError) as exc:
                raise ConnectionAbortedError(f"{reading.manifest.id}: {exc}") from None
            wire.tls.sendall(view)
            at += len(view)


async def _call(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on the loop, as a coroutine a thread can wait for."""
    return fn(*args)


def _address(sock: socket.socket) -> str:
    try:
        addr = sock.getpeername()
    except OSError:
        return "unknown"
    return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)


# -- the child's end ----------------------------------------------------------


class ChildLane:
    """The child's end of one lane for one attempt at a download, run in
    its own thread (``run``); the loop side is ``receive_lane``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        address: tuple[str, int],
        ctx: ssl.SSLContext,
        hello: Hello,
        parent: str,
        dl: Download,
        connect_timeout: float,
        chunk_timeout: float,
        rate: float,
        on_chunk: Callable[[bytes | memoryview], None],
    ) -> None:
        self.loop = loop
        self.address = address
        self.ctx = ctx
        self.hello = hello
        self.parent = parent
        self.dl = dl
        self.connect_timeout = connect_timeout
        self.chunk_timeout = chunk_timeout
        self.rate = rate
        self.on_chunk = on_chunk
        self.stop = threading.Event()
        # Chunks being written, the one being received, and one to spare.
        self.pool = BufferPool(dl.manifest.chunk_size, LANE_IN_FLIGHT + 2)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def abort(self) -> None:
        """From the loop: end the lane at once (cancelled, or paused)."""
        self.stop.set()
        with self._lock:
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)

    def run(self) -> bool:
        """The attempt; True when the fetch ended, False when it stopped
        between chunks because it was asked to (``stop``)."""
        host, port = self.address
        try:
            sock = socket.create_connection((host, port), timeout=self.connect_timeout)
        except OSError as exc:
            raise LaneRefused(f"cannot connect: {exc}") from None
        with self._lock:
            self._sock = sock
        if self.stop.is_set():
            sock.close()
            return False
        try:
            wire = self._open(sock, host)
            return self._receive(wire)
        finally:
            with self._lock:
                self._sock = None
            sock.close()

    def _open(self, sock: socket.socket, host: str) -> _Wire:
        """Preamble, TLS, HELLO/WELCOME and FETCH; LaneRefused if any of it
        fails (nothing of the package moved yet)."""
        try:
            sock.sendall(LANE_MAGIC)
            tls = self.ctx.wrap_socket(sock, server_hostname=host)
            peer = _peer_of(tls)
            if peer.name != self.parent:
                raise LaneRefused(f"the lane reached {peer.name}, not {self.parent}")
            wire = _Wire(tls, Connection(Side.CHILD, payload_buffer=self.pool.get))
            wire.send(self.hello)
            answer = wire.next()
        except (OSError, ssl.SSLError, RdsdError, ValueError) as exc:
            if isinstance(exc, LaneRefused):
                raise
            raise LaneRefused(str(exc) or type(exc).__name__) from None
        except ProtocolError as exc:
            raise LaneRefused(f"protocol: {exc}") from None
        if isinstance(answer, Error):
            raise LaneRefused(f"refused: {answer.reason}")
        if not isinstance(answer, Welcome) or answer.node != self.parent:
            raise LaneRefused(f"unexpected answer {answer!r}"[:200])
        try:
            wire.send(
                Fetch(
                    fetch_id=1, package=self.dl.manifest.id, offset=self.dl.verified, rate=self.rate
                )
            )
        except OSError as exc:
            raise LaneRefused(str(exc)) from None
        tls.settimeout(self.chunk_timeout)
        return wire

    def _receive(self, wire: _Wire) -> bool:
        dl = self.dl
        inflight: deque[tuple[Future[None], bytes | memoryview]] = deque()

        def settle(block: bool) -> None:
            # Oldest first: a written chunk goes to the loop in order.
            while inflight and (block or inflight[0][0].done() or len(inflight) > LANE_IN_FLIGHT):
                fut, data = inflight.popleft()
                fut.result()
                self.loop.call_soon_threadsafe(self.on_chunk, data)

        try:
            while True:
                try:
                    msg = wire.next()
                except TimeoutError:
                    raise TransferFailed(
                        f"no data from {self.parent} for {self.chunk_timeout:.0f}s"
                    ) from None
                except (OSError, ssl.SSLError) as exc:
                    if self.stop.is_set():
                        settle(True)
                        return False
                    raise TransferFailed(f"lane lost: {exc}") from None
                except ProtocolError as exc:
                    raise TransferFailed(f"lane: {exc}") from None
                if isinstance(msg, Chunk):
                    inflight.append((dl.lane_write(msg.offset, msg.data), msg.data))
                    settle(False)
                    if self.stop.is_set():
                        settle(True)
                        return False
                elif isinstance(msg, FetchEnd):
                    settle(True)
                    return True
                elif isinstance(msg, FetchFail):
                    settle(True)  # a failed write is the reason, if any
                    # An expired package stays expired: asking again cannot help.
                    raise TransferFailed(
                        f"{self.parent} refused: {msg.reason}",
                        retryable="expired" not in msg.reason,
                    )
                else:
                    settle(True)
                    why = msg.reason if isinstance(msg, Error | Goodbye) else "closed"
                    raise TransferFailed(f"lane lost: {self.parent} {why}")
        except (RdsdError, OSError) as exc:
            # A failed write (a bad chunk, a full disk) ends the attempt as
            # the session's receive ends it; TransferFailed passes unchanged.
            raise store_failure(exc) from None
        finally:
            # However the lane ended, every chunk written in order is handed
            # to the loop (the resume starts after them; ``settle`` stops at
            # the first that failed, raised above), and no write of ours runs
            # once the thread is gone (the download's descriptor may close next).
            with contextlib.suppress(BaseException):
                settle(True)
            for fut, _ in inflight:
                with contextlib.suppress(BaseException):
                    fut.result()


async def receive_lane(
    address: tuple[str, int],
    ctx: ssl.SSLContext,
    hello: Hello,
    parent: str,
    dl: Download,
    timeout: float,
    node: str,
    connect_timeout: float,
    progress: Callable[[int, int], None] | None = None,
    progress_every: float = 5.0,
    rate: float = 0.0,
    pause: Callable[[], bool] | None = None,
) -> None:
    """One attempt to complete ``dl`` over a lane to ``parent`` at
    ``address``, as ``transfer.receive`` does over the session: same
    errors (TransferFailed, TransferPaused), plus LaneRefused when the lane
    could not be opened (then no byte moved: use the session)."""
    loop = asyncio.get_running_loop()
    m = dl.manifest
    start = dl.verified
    last = time.monotonic()
    bound = log.bind(node=node, peer=parent, package=m.id)

    def on_chunk(data: bytes | memoryview) -> None:
        # On the loop, in order: the chunk is checked and on disk.
        nonlocal last
        if not dl.settled(data):
            lane.pool.give(data)
        now = time.monotonic()
        if progress is not None and now - last >= progress_every:
            last = now
            progress(dl.verified, m.size)
        if pause is not None and pause():
            lane.stop.set()

    lane = ChildLane(
        loop,
        address,
        ctx,
        hello,
        parent,
        dl,
        connect_timeout,
        max(timeout, CHUNK_WAIT),
        rate,
        on_chunk,
    )
    bound.info("fetch.start", offset=start, size=m.size, lane=True)
    done = start_thread(lane.run, f"rdsd-lane-{m.id}")
    try:
        finished = await asyncio.shield(done)
    except asyncio.CancelledError:
        lane.abort()
        with contextlib.suppress(BaseException):
            await done
        raise
    finally:
        dl.lane_ended()
    if not finished:
        raise TransferPaused(f"paused at byte {dl.verified}")
    # ``await done`` ran after every on_chunk the thread scheduled before it.
    await _finish(dl)
    bound.info("fetch.done", resumed_from=start, bytes=m.size - start, lane=True)


async def _finish(dl: Download) -> None:
    try:
        await dl.finish()
    except (RdsdError, OSError) as exc:
        raise store_failure(exc) from None
