"""The per-connection state machine, sans-IO.

A ``Connection`` is fed bytes with ``receive_data`` and hands back typed
messages from ``next_event``; ``send`` turns a message into the buffers to
write. Which side may send which message in which state lives in one table,
``TRANSITIONS``; anything missing from it is a protocol error, raised as
``LocalProtocolError`` when this side tries it and ``RemoteProtocolError``
when the peer does. Package fetches are tracked per ``fetch_id`` so that a
chunk for a fetch nobody asked for, or at the wrong offset, is refused here
rather than in the transfer code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from .errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from .frames import MAGIC, MAX_PAYLOAD, FrameDecoder, encode, encode_start
from .messages import (
    MAX_CLAIM,
    MAX_PRESENCE_BATCH,
    MAX_SOFTWARE,
    MAX_TOPOLOGY_BATCH,
    PROTOCOL_VERSION,
    Chunk,
    Error,
    Fetch,
    FetchCancel,
    FetchEnd,
    FetchFail,
    Hello,
    Message,
    MessageType,
    Presence,
    Topology,
)


class Side(Enum):
    """The child opens the connection and says HELLO; the parent answers."""

    CHILD = "child"
    PARENT = "parent"


class State(Enum):
    START = "start"  # nothing exchanged yet
    HELLO_SENT = "hello-sent"  # child has said HELLO, parent has not answered
    OPEN = "open"
    CLOSED = "closed"  # ERROR or GOODBYE seen in either direction


class NeedData:
    """Returned by ``next_event`` when a whole frame has not arrived yet."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its side. ``graceful`` is true after GOODBYE or ERROR
    and false for an EOF in the middle of the conversation."""

    graceful: bool


C, P = Side.CHILD, Side.PARENT
T = MessageType

_CHILD_OPEN = (
    T.PENDING_QUERY,
    T.JOB_ANNOUNCE,
    T.FETCH,
    T.FETCH_CANCEL,
    T.REPORT,
    T.TOPOLOGY,
    T.HOLDINGS,
    T.PRESENCE,
    T.PING,
    T.PONG,
)
_PARENT_OPEN = (
    T.JOB_NOTICE,
    T.PENDING_DONE,
    T.CHUNK,
    T.FETCH_END,
    T.FETCH_FAIL,
    T.REPORT_ACK,
    T.JOB_CANCEL,
    T.REVOKED,
    T.PING,
    T.PONG,
)

# (state, sender, message type) -> next state. The whole protocol in one table.
TRANSITIONS: dict[tuple[State, Side, MessageType], State] = {
    (State.START, C, T.HELLO): State.HELLO_SENT,
    (State.HELLO_SENT, P, T.WELCOME): State.OPEN,
    **{(State.OPEN, C, t): State.OPEN for t in _CHILD_OPEN},
    **{(State.OPEN, P, t): State.OPEN for t in _PARENT_OPEN},
    **{
        (s, side, t): State.CLOSED
        for s in (State.START, State.HELLO_SENT, State.OPEN)
        for side in (C, P)
        for t in (T.ERROR, T.GOODBYE)
    },
}

MAX_OPEN_FETCHES = 64

#: Header plus payload of one frame before a session is established: HELLO
#: and WELCOME are a few hundred bytes, and a peer nobody has welcomed yet
#: must not make this side hold a large frame while it trickles in.
PRE_SESSION_FRAME = 64 * 1024

# state -> cap on the next frame received (header + payload; None: only the
# codec's own caps). Checked as soon as a frame's prefix arrives, before its
# body is buffered. Like TRANSITIONS, the whole rule in one table.
FRAME_CAPS: dict[State, int | None] = {
    State.START: PRE_SESSION_FRAME,
    State.HELLO_SENT: PRE_SESSION_FRAME,
    State.OPEN: None,
    State.CLOSED: PRE_SESSION_FRAME,
}


class Connection:
    """One side of one rdsd connection."""

    # A parent holds one per child, idle most of the time: no __dict__ each.
    __slots__ = (
        "__weakref__",  # tests watch that closed connections are freed
        "_decoder",
        "_eof",
        "_error",
        "_magic_seen",
        "_magic_sent",
        "_max_payload",
        "_state",
        "open_fetches",
        "peer_side",
        "side",
    )

    def __init__(
        self,
        side: Side,
        max_payload: int = MAX_PAYLOAD,
        payload_buffer: Callable[[int], bytearray] = bytearray,
    ) -> None:
        self.side = side
        self.peer_side = P if side is C else C
        self._decoder = FrameDecoder(max_payload, payload_buffer)
        self.state = State.START
        self._max_payload = max_payload
        self._magic_sent = False
        self._magic_seen = False
        self._eof = False
        self._error: RemoteProtocolError | None = None
        # fetch_id -> next expected chunk offset, for fetches still running.
        self.open_fetches: dict[int, int] = {}

    @property
    def state(self) -> State:
        return self._state

    @state.setter
    def state(self, value: State) -> None:
        # Every change of state sets the frame cap the table gives it.
        self._state = value
        self._decoder.max_frame = FRAME_CAPS[value]

    # -- sending ---------------------------------------------------------

    def send(self, msg: Message) -> list[bytes | memoryview]:
        """Buffers to write for ``msg``; raises LocalProtocolError if the
        table does not allow this side to send it now. A refused message
        changes nothing: encode first, so an oversized one does not count."""
        buffers = encode(msg, self._max_payload)
        if msg.TYPE is T.ERROR and self.state is not State.CLOSED:
            self.state = State.CLOSED
        else:
            self.state = self._advance(self.side, msg, LocalProtocolError)
        if not self._magic_sent:
            self._magic_sent = True
            buffers[0] = MAGIC + bytes(buffers[0])
        return buffers

    def send_chunk_start(self, fetch_id: int, offset: int, length: int) -> bytes:
        """The bytes that start a CHUNK of ``length`` payload bytes, which
        the caller writes itself right after, as it reads them: a sender
        streaming a chunk from a file need not hold it whole. Checked and
        tracked as ``send`` checks a CHUNK; nothing else may be sent on the
        connection until all ``length`` bytes have followed."""
        if not 0 < length <= self._max_payload:
            raise LocalProtocolError(f"CHUNK payload of {length} bytes is out of range")
        msg = Chunk(fetch_id=fetch_id, offset=offset)
        if (self.state, self.side, msg.TYPE) not in TRANSITIONS:
            side, state = self.side.value, self.state.value
            raise LocalProtocolError(f"{side} may not send CHUNK in state {state}")
        self._track_chunk(fetch_id, offset, length, LocalProtocolError)
        start = encode_start(msg, length)
        if not self._magic_sent:
            self._magic_sent = True
            start = MAGIC + start
        return start

    def send_error(self, exc: ProtocolError) -> list[bytes | memoryview]:
        """The ERROR message that tells the peer why we are hanging up."""
        if self.state is State.CLOSED and self._magic_sent:
            return []
        self.state = State.OPEN if self.state is State.CLOSED else self.state
        return self.send(Error(code=int(exc.code), reason=str(exc)[:500]))

    # -- receiving -------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed. The
        frame being received is checked against the caps as soon as its
        prefix is here; after a violation (raised by ``next_event``) nothing
        more is buffered."""
        if not data:
            self._eof = True
            return
        if self._error is not None:
            return
        self._decoder.feed(data)
        try:
            if not self._magic_seen:
                if self._decoder.take_magic() is None:
                    return
                self._magic_seen = True
            self._decoder.check_prefix()
        except RemoteProtocolError as exc:
            self._error = _bare(exc)
            self._decoder.discard()

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A buffer to receive the peer's next bytes into, for readers that
        can (``recv_into``, ``BufferedProtocol``); report the count with
        ``buffer_updated``. During a CHUNK payload it is the payload's own
        buffer, so the bytes land where the message will carry them."""
        return self._decoder.get_buffer(sizehint)

    @property
    def filling_payload(self) -> bool:
        """The last ``get_buffer`` was the rest of a payload's own buffer: a
        reader that receives in a loop (a blocking socket in a thread) may
        fill it whole and report once, instead of a step per TLS record."""
        return self._decoder.filling_payload

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` from the peer were written into the last ``get_buffer``;
        after a violation they are dropped, as ``receive_data`` drops them."""
        self._decoder.buffer_updated(nbytes)
        if self._error is not None:
            self._decoder.discard()

    @property
    def unread(self) -> int:
        """Bytes received and not yet handed out as messages, beyond the
        payload in progress: a reader pauses while this is large."""
        return self._decoder.unread

    def next_event(self) -> Message | NeedData | ConnectionClosed:
        """The next message from the peer, ``NEED_DATA``, or ``ConnectionClosed``."""
        if self._error is not None:
            raise _bare(self._error)
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self._error = _bare(exc)
            raise

    def _next_event(self) -> Message | NeedData | ConnectionClosed:
        if not self._magic_seen:
            if self._decoder.take_magic() is None:
                return self._eof_or_need()
            self._magic_seen = True
        msg = self._decoder.next_message()
        if msg is None:
            return self._eof_or_need()
        if msg.TYPE is T.HELLO and isinstance(msg, Hello):
            if msg.proto != PROTOCOL_VERSION:
                raise RemoteProtocolError(
                    f"protocol version {msg.proto} not supported (want {PROTOCOL_VERSION})",
                    ErrorCode.UNSUPPORTED_VERSION,
                )
            if len(msg.attach) > MAX_CLAIM:
                raise RemoteProtocolError(f"HELLO attach claim longer than {MAX_CLAIM} bytes")
        if self.state is State.CLOSED:
            raise RemoteProtocolError(f"{msg.TYPE.name} after the connection was closed")
        self.state = self._advance(self.peer_side, msg, RemoteProtocolError)
        return msg

    def _eof_or_need(self) -> NeedData | ConnectionClosed:
        if not self._eof:
            return NEED_DATA
        if self._decoder.buffered:
            raise RemoteProtocolError("connection closed in the middle of a frame")
        return ConnectionClosed(graceful=self.state is State.CLOSED)

    # -- the table and the fetch bookkeeping -----------------------------

    def _advance(
        self, sender: Side, msg: Message, err: type[LocalProtocolError] | type[RemoteProtocolError]
    ) -> State:
        key = (self.state, sender, msg.TYPE)
        nxt = TRANSITIONS.get(key)
        if nxt is None:
            raise err(f"{sender.value} may not send {msg.TYPE.name} in state {self.state.value}")
        self._track_fetch(msg, err)
        if isinstance(msg, Presence):
            _check_presence(msg, err)
        elif isinstance(msg, Topology):
            _check_topology(msg, err)
        return nxt

    def _track_fetch(
        self, msg: Message, err: type[LocalProtocolError] | type[RemoteProtocolError]
    ) -> None:
        fetches = self.open_fetches
        if isinstance(msg, Fetch):
            if msg.fetch_id in fetches:
                raise err(f"fetch {msg.fetch_id} is already open")
            if len(fetches) >= MAX_OPEN_FETCHES:
                raise err(f"more than {MAX_OPEN_FETCHES} fetches open at once")
            if msg.offset < 0:
                raise err("fetch offset is negative")
            fetches[msg.fetch_id] = msg.offset
        elif isinstance(msg, Chunk):
            self._track_chunk(msg.fetch_id, msg.offset, len(msg.data), err)
        elif isinstance(msg, (FetchEnd, FetchFail)):
            end = fetches.get(msg.fetch_id)
            if end is None:
                raise err(f"{msg.TYPE.name} for fetch {msg.fetch_id}, which is not open")
            if isinstance(msg, FetchEnd) and msg.size != end:
                raise err(f"fetch {msg.fetch_id} ended at {msg.size}, data reached {end}")
            del fetches[msg.fetch_id]
        elif isinstance(msg, FetchCancel):
            # The parent may already have finished it: a late cancel is harmless.
            pass

    def _track_chunk(
        self,
        fetch_id: int,
        offset: int,
        length: int,
        err: type[LocalProtocolError] | type[RemoteProtocolError],
    ) -> None:
        fetches = self.open_fetches
        expected = fetches.get(fetch_id)
        if expected is None:
            raise err(f"chunk for fetch {fetch_id}, which is not open")
        if offset != expected:
            raise err(f"chunk at offset {offset}, expected {expected}")
        if not length:
            raise err("empty chunk")
        fetches[fetch_id] = expected + length


def _bare(exc: RemoteProtocolError) -> RemoteProtocolError:
    """A copy of ``exc`` without a traceback. The error a connection keeps
    (it is sticky) must not be the one raised: a raised exception's
    traceback holds the frames it passed through, which hold the connection
    and its session, and that cycle kept every refused connection's TLS
    state alive until the next full garbage collection (measured: 105
    sessions after a burst of 150 refused peers)."""
    return type(exc)(str(exc), exc.code)


def _check_topology(
    msg: Topology, err: type[LocalProtocolError] | type[RemoteProtocolError]
) -> None:
    """TOPOLOGY is bounded: a relay with a large subtree sends several."""
    count = len(msg.nodes) + len(msg.removed)
    if count > MAX_TOPOLOGY_BATCH:
        raise err(f"TOPOLOGY names {count} nodes, more than {MAX_TOPOLOGY_BATCH}")
    if msg.reset and msg.removed:
        raise err("TOPOLOGY with reset replaces the subtree: it removes nothing by name")
    if set(msg.nodes) & set(msg.removed):
        raise err("TOPOLOGY both adds and removes a node")
    if any(len(claim) > MAX_CLAIM for claim in msg.nodes.values()):
        raise err(f"TOPOLOGY carries a claim longer than {MAX_CLAIM} bytes")


def _check_presence(
    msg: Presence, err: type[LocalProtocolError] | type[RemoteProtocolError]
) -> None:
    """PRESENCE is bounded: a relay with a large subtree sends several."""
    count = len(msg.online) + len(msg.offline)
    if count > MAX_PRESENCE_BATCH:
        raise err(f"PRESENCE names {count} nodes, more than {MAX_PRESENCE_BATCH}")
    if not set(msg.software) <= set(msg.online):
        raise err("PRESENCE gives software for a node it does not put online")
    if any(len(s) > MAX_SOFTWARE for s in msg.software.values()):
        raise err(f"PRESENCE software longer than {MAX_SOFTWARE} characters")
    if set(msg.online) & set(msg.offline):
        raise err("PRESENCE puts a node both online and offline")
    if any(len(claim) > MAX_CLAIM for claim in msg.online.values()):
        raise err(f"PRESENCE carries a claim longer than {MAX_CLAIM} bytes")
