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
from typing import Any

import msgpack

from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .messages import Message, from_wire, to_wire

PREFIX = struct.Struct(">II")
MAGIC = b"RDS\x01"
MAX_HEADER = 1024 * 1024
MAX_PAYLOAD = 16 * 1024 * 1024


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
    """Accumulates bytes and yields whole messages, enforcing the caps."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self._max_payload = max_payload
        self._need: tuple[int, int] | None = None
        #: Cap on header plus payload of the next frame, over the two caps
        #: above; the connection lowers it until a session is established.
        self.max_frame: int | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def discard(self) -> None:
        """Drop everything buffered (the peer broke the rules: nothing it
        sent is read any more)."""
        self._buf = bytearray()
        self._need = None

    def check_prefix(self) -> None:
        """Check the lengths of the frame being received against the caps
        as soon as its prefix is here, so a frame over the cap is refused
        before its body is buffered."""
        if self._need is not None or len(self._buf) < PREFIX.size:
            return
        hlen, plen = PREFIX.unpack_from(self._buf)
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
        self._need = (hlen, plen)

    def next_message(self) -> Message | None:
        """The next complete message, or ``None`` if more bytes are needed."""
        self.check_prefix()
        if self._need is None:
            return None
        hlen, plen = self._need
        end = PREFIX.size + hlen + plen
        if len(self._buf) < end:
            return None
        header = _unpack_header(bytes(self._buf[PREFIX.size : PREFIX.size + hlen]))
        payload = bytes(self._buf[PREFIX.size + hlen : end])
        del self._buf[:end]
        self._need = None
        return from_wire(header, payload)

    def take_magic(self) -> bool | None:
        """Check the connection preamble: True once seen, None if incomplete."""
        if len(self._buf) < len(MAGIC):
            if not MAGIC.startswith(bytes(self._buf)):
                raise RemoteProtocolError("not an rdsd peer (bad preamble)")
            return None
        if bytes(self._buf[: len(MAGIC)]) != MAGIC:
            raise RemoteProtocolError("not an rdsd peer (bad preamble)")
        del self._buf[: len(MAGIC)]
        return True
