"""rdsd's wire protocol, sans-IO: bytes in, typed messages out; messages in,
bytes out. Nothing here touches sockets, asyncio or files, so the same code
serves the daemon, tests on bytes alone, and any other implementation that
wants to check itself against ours. ``SPEC.md`` describes the format."""

from .connection import (
    NEED_DATA,
    TRANSITIONS,
    Connection,
    ConnectionClosed,
    NeedData,
    Side,
    State,
)
from .errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from .frames import MAGIC, MAX_HEADER, MAX_PAYLOAD, FrameDecoder, encode
from .messages import (
    MESSAGE_CLASSES,
    PROTOCOL_VERSION,
    Chunk,
    Error,
    Fetch,
    FetchCancel,
    FetchEnd,
    FetchFail,
    Goodbye,
    Hello,
    Holdings,
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
    Topology,
    Welcome,
    is_destination,
    is_package_id,
    is_safe_name,
)

__all__ = [
    "MAGIC", "MAX_HEADER", "MAX_PAYLOAD", "MESSAGE_CLASSES", "NEED_DATA", "PROTOCOL_VERSION",
    "TRANSITIONS", "Chunk", "Connection", "ConnectionClosed", "Error", "ErrorCode", "Fetch",
    "FetchCancel", "FetchEnd", "FetchFail", "FrameDecoder", "Goodbye", "Hello", "Holdings",
    "JobCancel", "JobNotice", "LocalProtocolError", "Message", "MessageType", "NeedData",
    "PendingDone", "PendingQuery", "Ping", "Pong", "ProtocolError", "RemoteProtocolError",
    "Report", "ReportAck", "Side", "State", "Topology", "Welcome", "encode", "is_destination",
    "is_package_id", "is_safe_name",
]
