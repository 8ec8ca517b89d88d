"""Frame codec: a fixed prefix, a msgpack header, then optional raw payload.

Wire layout of one frame (all integers big-endian)::

    +------------------+-------------------+-----------------+--------------+
    | header_len (u32) | payload_len (u32) | header (msgpack)| payload (raw)|
    +------------------+-------------------+-----------------+--------------+

Chunk data is never wrapped in msgpack ``bin``: it is written straight after
the header so a sender can hand the kernel the file's bytes untouched. Both
lengths are checked against hard caps *before* anything is buffered, so a
hostile peer cannot make us allocate more than one frame's worth.
"""

from __future__ import annotations

import struct
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import msgpack

from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .messages import Message, MessageType, from_wire, to_wire
from .names import MAX_HEADER as MAX_HEADER
from .names import MAX_PAYLOAD as MAX_PAYLOAD

PREFIX = struct.Struct(">II")
MAGIC = b"RDS\x01"
#: Sent in the clear before TLS by a child opening a lane, a second
#: connection that carries one package fetch (SPEC section 6a). Its first
#: byte can never start a TLS record (0x16), so a parent tells the two kinds
#: of connection apart from the first byte.
LANE_MAGIC = b"RDSLANE\x01"
#: Size of a receive buffer handed out between payloads (headers, control
#: frames, the start of a payload): TLS records are at most 16 KiB.
RECV_BUFFER = 64 * 1024

# One such buffer per thread, shared by every decoder that thread runs: a
# read between payloads is copied out of it at once (those bytes are small:
# control frames, a chunk's header), so no connection keeps a buffer of its
# own while idle and no read allocates one (a relay with thousands of idle
# children held one each, and the heap kept the high-water of a storm).
_scratch = threading.local()


def _scratch_buffer() -> bytearray:
    buf: bytearray | None = getattr(_scratch, "buf", None)
    if buf is None:
        buf = _scratch.buf = bytearray(RECV_BUFFER)
    return buf


def encode(msg: Message, max_payload: int = MAX_PAYLOAD) -> list[bytes | memoryview]:
    """Serialise ``msg`` as buffers to write in order (payload not copied)."""
    header = msgpack.packb(to_wire(msg), use_bin_type=True)
    payload = msg.payload
    if len(header) > MAX_HEADER:
        raise LocalProtocolError(f"{msg.TYPE.name} header of {len(header)} bytes over the cap")
    if len(payload) > max_payload:
        raise LocalProtocolError(f"{msg.TYPE.name} payload of {len(payload)} bytes over the cap")
    prefix = PREFIX.pack(len(header), len(payload)) + header
    return [prefix, payload] if len(payload) else [prefix]


def encode_start(msg: Message, payload_length: int) -> bytes:
    """The prefix and header of ``msg``'s frame for a payload of
    ``payload_length`` bytes that the caller writes itself right after (a
    chunk streamed from a file in pieces); ``msg`` itself carries none."""
    header = msgpack.packb(to_wire(msg), use_bin_type=True)
    return PREFIX.pack(len(header), payload_length) + header


def _unpack_header(raw: bytes) -> Any:
    try:
        return msgpack.unpackb(
            raw,
            raw=False,
            use_list=True,
            strict_map_key=True,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise RemoteProtocolError(f"malformed msgpack header: {exc}") from None
    except Exception as exc:  # msgpack raises a handful of types on bad input
        raise RemoteProtocolError(f"malformed msgpack header: {exc!r}") from None


class FrameDecoder:
    """Takes the peer's bytes as they come and yields whole messages,
    enforcing the caps.

    Received buffers are queued as they are (no copy); prefixes and headers,
    which are small, are gathered from them, and a payload is copied once,
    straight into a buffer of its own sized from the checked prefix. A CHUNK
    message's data is a memoryview of that buffer, so the bytes go on to the
    hash and the file without another copy; nothing is ever accumulated,
    sliced off the front and deleted.

    A reader that can receive into a buffer (``recv_into``, asyncio's
    ``BufferedProtocol``) asks ``get_buffer`` where to put the next bytes
    and reports how many with ``buffer_updated``: while a payload is being
    received that is the rest of the payload's own buffer, so its bytes are
    written there once (by the TLS layer, decrypting) and never copied.
    """

    # One per connection, idle most of the time: no __dict__ each.
    __slots__ = (
        "__weakref__",  # tests watch that closed connections are freed
        "_direct",
        "_error",
        "_framing",
        "_got",
        "_header",
        "_into",
        "_max_payload",
        "_need",
        "_payload",
        "_payload_buffer",
        "_queued",
        "_segments",
        "max_frame",
    )

    def __init__(
        self, max_payload: int = MAX_PAYLOAD, payload_buffer: Callable[[int], bytearray] = bytearray
    ) -> None:
        # Received bytes not yet taken, as they came. A deque costs about
        # 0.7 KiB even empty, and an idle connection has nothing queued: it
        # exists only while something is (``()`` otherwise).
        self._segments: deque[memoryview] | tuple[()] = ()
        # Makes the buffer a payload of the given size is received into; a
        # reader that recycles chunk buffers passes its pool here (a fresh
        # 1 MiB buffer per chunk costs a mapping and its page faults).
        self._payload_buffer = payload_buffer
        self._queued = 0
        self._max_payload = max_payload
        self._need: tuple[int, int] | None = None
        #: Cap on header plus payload of the next frame, over the two caps
        #: above; the connection lowers it until a session is established.
        self.max_frame: int | None = None
        self._header: Any = None
        self._payload: bytearray | memoryview | None = None
        self._got = 0
        # The (shared) buffer last handed out by get_buffer, unless it was a
        # payload's.
        self._into: bytearray | None = None
        self._direct = False
        # Frames start once the preamble is taken; an error found early waits here.
        self._framing = False
        self._error: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received that are not part of a message handed out yet."""
        return self._queued + self._got + (0 if self._need is None else PREFIX.size + self._need[0])

    @property
    def unread(self) -> int:
        """Bytes received beyond what the payload in progress still needs,
        plus a payload complete and not yet taken: what a reader should stop
        receiving at (backpressure), since nothing else bounds it."""
        done = self._payload is not None and self._got == len(self._payload)
        return self._queued + (self._got if done else 0)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next bytes may be written (then ``buffer_updated``)."""
        payload = self._payload
        if payload is not None and not self._segments and self._got < len(payload):
            self._direct = True
            return memoryview(payload)[self._got :]
        self._direct = False
        self._into = _scratch_buffer()
        return memoryview(self._into)

    @property
    def filling_payload(self) -> bool:
        """The last ``get_buffer`` handed out the rest of a payload's own
        buffer: a reader may fill all of it before ``buffer_updated``."""
        return self._direct

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last ``get_buffer``."""
        if nbytes <= 0:
            return
        if self._direct:
            self._got += nbytes
            self._direct = False
            return
        into, self._into = self._into, None
        assert into is not None, "buffer_updated without get_buffer"
        if self._error is not None:
            return  # the peer broke the rules: nothing more it sends is kept
        self.feed(bytes(memoryview(into)[:nbytes]))  # the buffer is shared
        if self._framing and self._payload is None and self._error is None:
            # Read the next frame's prefix and header now, so the rest of its
            # payload is received straight into its buffer even if the
            # reader takes the message later. A bad frame is reported by
            # next_message, as if it were found there.
            try:
                self._advance()
            except RemoteProtocolError as exc:
                # Kept without its traceback, whose frames hold this decoder
                # (a cycle that kept refused connections until a full GC).
                self._error = type(exc)(str(exc), exc.code)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data``; the caller must not change it afterwards."""
        if data:
            segments = self._segments
            if not isinstance(segments, deque):
                segments = self._segments = deque()
            segments.append(memoryview(data).cast("B"))
            self._queued += len(data)

    def _take(self, n: int) -> bytes:
        """Remove the next ``n`` queued bytes (n <= queued) and return them."""
        first = self._first()
        if len(first) >= n:
            out = bytes(first[:n])
            self._consume(n)
            return out
        parts = bytearray()
        while len(parts) < n:
            seg = self._first()
            k = min(n - len(parts), len(seg))
            parts += seg[:k]
            self._consume(k)
        return bytes(parts)

    def _first(self) -> memoryview:
        """The first queued segment (there is one)."""
        segments = self._segments
        assert isinstance(segments, deque) and segments, "nothing queued"
        return segments[0]

    def _consume(self, n: int) -> None:
        segments = self._segments
        assert isinstance(segments, deque)
        seg = segments[0]
        if n == len(seg):
            segments.popleft()
            if not segments:
                self._segments = ()
        else:
            segments[0] = seg[n:]
        self._queued -= n

    def _peek(self, n: int) -> bytes:
        """The next ``n`` queued bytes (n <= queued), left in the queue."""
        out = bytearray()
        for seg in self._segments:
            out += seg[: n - len(out)]
            if len(out) >= n:
                break
        return bytes(out)

    def discard(self) -> None:
        """Drop everything buffered (the peer broke the rules: nothing it
        sent is read any more)."""
        self._segments = ()
        self._queued = 0
        self._need, self._header, self._payload, self._got = None, None, None, 0
        self._into, self._direct = None, False

    def check_prefix(self) -> None:
        """Check the lengths of the frame being received against the caps
        as soon as its prefix is here, so a frame over the cap is refused
        before its body is buffered."""
        if self._need is None and self._queued >= PREFIX.size:
            self._need = self._checked(*PREFIX.unpack(self._peek(PREFIX.size)))

    def next_message(self) -> Message | None:
        """The next complete message, or ``None`` if more bytes are needed."""
        if self._error is not None:
            # A fresh copy each time: raising the kept one would give it a
            # traceback, and with it a cycle through this decoder.
            raise type(self._error)(str(self._error), self._error.code)
        if not self._advance():
            return None
        header, payload = self._header, self._payload
        assert payload is not None
        self._need, self._header, self._payload, self._got = None, None, None, 0
        return from_wire(header, memoryview(payload) if _is_chunk(header) else bytes(payload))

    def _checked(self, hlen: int, plen: int) -> tuple[int, int]:
        """The prefix's lengths, if they are within the caps."""
        if hlen == 0 or hlen > MAX_HEADER:
            raise RemoteProtocolError(
                f"frame header of {hlen} bytes outside 1..{MAX_HEADER}",
                ErrorCode.FRAME_TOO_LARGE,
            )
        if plen > self._max_payload:
            raise RemoteProtocolError(
                f"frame payload of {plen} bytes over the cap of {self._max_payload}",
                ErrorCode.FRAME_TOO_LARGE,
            )
        if self.max_frame is not None and hlen + plen > self.max_frame:
            raise RemoteProtocolError(
                f"frame of {hlen + plen} bytes over the cap of {self.max_frame} "
                "before the session is established",
                ErrorCode.FRAME_TOO_LARGE,
            )
        return hlen, plen

    def _advance(self) -> bool:
        """Check the prefix, decode the header and fill the payload from
        what is queued, as far as the bytes go; True once the frame is whole."""
        if self._need is None:
            if self._queued < PREFIX.size:
                return False
            self._need = self._checked(*PREFIX.unpack(self._peek(PREFIX.size)))
        hlen, plen = self._need
        if self._payload is None:
            if self._queued < PREFIX.size + hlen:
                return False
            self._take(PREFIX.size)
            self._header = _unpack_header(self._take(hlen))
            # Sized from the checked prefix; filled as the payload arrives.
            self._payload = self.payload_buffer(self._header, plen)
            self._got = 0
        payload = self._payload
        if self._got < plen:
            view = memoryview(payload)
            while self._segments and self._got < plen:
                seg = self._first()
                k = min(plen - self._got, len(seg))
                view[self._got : self._got + k] = seg[:k]
                self._got += k
                self._consume(k)
        return self._got == plen

    def payload_buffer(self, header: Any, size: int) -> bytearray | memoryview:
        """A writable buffer of ``size`` bytes for the payload of the frame
        whose (decoded, unchecked) ``header`` is given: by default one from
        the ``payload_buffer`` the decoder was made with (a fresh one, or a
        pooled one a lane recycles), which the message then owns. A receiver
        that only counts payload bytes (the fleet simulator's clients) may
        hand out a shared one instead."""
        return self._payload_buffer(size)

    def take_magic(self) -> bool | None:
        """Check the connection preamble: True once seen, None if incomplete."""
        got = self._peek(min(self._queued, len(MAGIC)))
        if not MAGIC.startswith(got):
            raise RemoteProtocolError("not an rdsd peer (bad preamble)")
        if len(got) < len(MAGIC):
            return None
        self._take(len(MAGIC))
        self._framing = True
        return True


def _is_chunk(header: Any) -> bool:
    """Does this header say CHUNK (whose data stays a view of its buffer)?"""
    return (
        isinstance(header, list)
        and bool(header)
        and type(header[0]) is int
        and header[0] == MessageType.CHUNK
    )
