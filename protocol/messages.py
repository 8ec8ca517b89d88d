"""Typed messages: one frozen dataclass per message type, tagged by an IntEnum.

A message travels as a msgpack array ``[tag, {field: value, ...}]`` in the
frame header; CHUNK and JOB_NOTICE also carry raw payload bytes after the
header (see ``frames.py``). Field types are checked on decode against the
dataclass annotations, so a message object is always well typed whatever the
peer sent. Names that end up in file paths or database keys (nodes, packages,
jobs) are checked against strict patterns here, at the edge, so no layer
above ever sees ``..``, ``/`` or NUL in them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Annotated, Any, ClassVar, Union

from .errors import ErrorCode, RemoteProtocolError
from .names import is_destination as is_destination
from .names import is_package_id as is_package_id
from .names import is_safe_name as is_safe_name

PROTOCOL_VERSION = 3

#: Names per TOPOLOGY message (added and removed together): with
#: 64-character names and attach claims of the largest allowed size, about
#: 0.9 MiB of header, inside the header cap.
MAX_TOPOLOGY_BATCH = 2000
#: The largest signed claim (an attach claim in HELLO, TOPOLOGY or
#: PRESENCE) a receiver takes; real ones are under 300 bytes.
MAX_CLAIM = 400

# At most this many names (online plus offline) in one PRESENCE message; a
# larger change goes as several messages.
MAX_PRESENCE_BATCH = 1000
# At most this many names in one REVOKED message; a longer list goes as
# several, all but the last marked ``more`` (64-character names: 0.3 MiB).
MAX_REVOKED_BATCH = 5000
# The most names a receiver gathers for one revocation list (all its
# batches): a parent cannot make a child hold more than that.
MAX_REVOKED_TOTAL = 1_000_000
# HELLO.software and PRESENCE software strings are at most this long.
MAX_SOFTWARE = 64


class Pattern(IntEnum):
    """Marks a ``str`` field whose value must match a safe-name pattern."""

    NAME = 1  # node names, job ids
    PACKAGE = 2  # NAME-VERSION


_CHECKERS = {Pattern.NAME: is_safe_name, Pattern.PACKAGE: is_package_id}

Name = Annotated[str, Pattern.NAME]
PackageId = Annotated[str, Pattern.PACKAGE]


class MessageType(IntEnum):
    """Wire tags. Values are part of the protocol: never renumber."""

    HELLO = 1
    WELCOME = 2
    JOB_NOTICE = 3
    PENDING_QUERY = 4
    PENDING_DONE = 5
    FETCH = 6
    CHUNK = 7
    FETCH_END = 8
    FETCH_FAIL = 9
    FETCH_CANCEL = 10
    REPORT = 11
    REPORT_ACK = 12
    TOPOLOGY = 13
    JOB_CANCEL = 14
    PING = 15
    PONG = 16
    ERROR = 17
    GOODBYE = 18
    HOLDINGS = 19
    JOB_ANNOUNCE = 20
    REVOKED = 21
    PRESENCE = 22


@dataclass(frozen=True, slots=True)
class Message:
    """Base class; ``TYPE`` is the wire tag, ``HAS_PAYLOAD`` allows raw bytes."""

    TYPE: ClassVar[MessageType]
    HAS_PAYLOAD: ClassVar[bool] = False
    #: Optional fields written only when they differ from their default, so
    #: a peer that predates them never sees them unless they are used.
    SPARSE: ClassVar[frozenset[str]] = frozenset()

    @property
    def payload(self) -> bytes | memoryview:
        return b""


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """First message from the child. ``purpose`` is ``session`` for a daemon's
    long-lived link and ``query`` for a one-shot ``rdsft -a`` connection, which
    must not become the route to the node."""

    TYPE: ClassVar[MessageType] = MessageType.HELLO
    node: Name
    role: str
    purpose: str = "session"
    proto: int = PROTOCOL_VERSION
    software: str = ""
    #: The child's signed attach claim naming this parent (version 3): how a
    #: node proves where it is to every node above, through relays that can
    #: forward the claim but not forge it. Refused when missing or bad.
    attach: bytes = field(default=b"", repr=False)


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    """Parent's answer to HELLO. ``role`` tells the child whether its parent is
    the managing server (resume on failure) or a relay (restart on failure)."""

    TYPE: ClassVar[MessageType] = MessageType.WELCOME
    SPARSE: ClassVar[frozenset[str]] = frozenset({"lanes"})
    node: Name
    role: str
    proto: int = PROTOCOL_VERSION
    time: float = 0.0
    #: The parent takes lane connections on this same address (SPEC 6a):
    #: a large package may be fetched over a connection of its own.
    lanes: bool = False


@dataclass(frozen=True, slots=True)
class JobNotice(Message):
    """A job for ``destinations`` (this child or nodes below it). The payload
    is the server-signed manifest envelope of the package. ``generation``
    grows when failed destinations are retried, so a child knows a notice it
    has seen before asks for a new attempt."""

    TYPE: ClassVar[MessageType] = MessageType.JOB_NOTICE
    HAS_PAYLOAD: ClassVar[bool] = True
    job: Name
    type: str
    package: PackageId
    destinations: list[Name]
    at: float | None = None
    origin: Name | None = None
    generation: int = 0
    manifest: bytes = field(default=b"", repr=False)
    # Pacing and windows of the job (SPEC section 5): bytes per second on
    # every hop (0: none) and "HH:MM-HH:MM" windows in each node's local time.
    rate: float = 0.0
    windows: list[str] = field(default_factory=list)
    SPARSE: ClassVar[frozenset[str]] = frozenset({"rate", "windows"})

    @property
    def payload(self) -> bytes | memoryview:
        return self.manifest


@dataclass(frozen=True, slots=True)
class JobAnnounce(Message):
    """A relay tells its parent about a job created at the relay (or below
    it), so its status is known upstream too. Acknowledged with REPORT_ACK
    whose ``report_id`` is ``job:`` followed by the job id."""

    TYPE: ClassVar[MessageType] = MessageType.JOB_ANNOUNCE
    HAS_PAYLOAD: ClassVar[bool] = True
    job: Name
    type: str
    package: PackageId
    destinations: list[Name]
    origin: Name
    at: float | None = None
    manifest: bytes = field(default=b"", repr=False)
    rate: float = 0.0
    windows: list[str] = field(default_factory=list)
    SPARSE: ClassVar[frozenset[str]] = frozenset({"rate", "windows"})

    @property
    def payload(self) -> bytes | memoryview:
        return self.manifest


@dataclass(frozen=True, slots=True)
class PendingQuery(Message):
    """Child asks for every open job addressed to it (or, from a relay, to
    ``node`` below it); answered by one JOB_NOTICE per job and then
    PENDING_DONE naming the same node."""

    TYPE: ClassVar[MessageType] = MessageType.PENDING_QUERY
    node: Name | None = None  # asked on behalf of a node below; default the sender


@dataclass(frozen=True, slots=True)
class PendingDone(Message):
    TYPE: ClassVar[MessageType] = MessageType.PENDING_DONE
    jobs: list[Name]
    node: Name | None = None


@dataclass(frozen=True, slots=True)
class Fetch(Message):
    """Ask for a package from byte ``offset`` (a multiple of its chunk size)."""

    TYPE: ClassVar[MessageType] = MessageType.FETCH
    fetch_id: int
    package: PackageId
    offset: int = 0
    # The most bytes per second the child takes from this parent over all
    # its fetches (its download limit); 0: none. The parent paces to it.
    rate: float = 0.0
    SPARSE: ClassVar[frozenset[str]] = frozenset({"rate"})


@dataclass(frozen=True, slots=True)
class Chunk(Message):
    """One manifest chunk at ``offset``; the raw bytes follow the header."""

    TYPE: ClassVar[MessageType] = MessageType.CHUNK
    HAS_PAYLOAD: ClassVar[bool] = True
    fetch_id: int
    offset: int
    data: bytes | memoryview = field(default=b"", repr=False)

    @property
    def payload(self) -> bytes | memoryview:
        return self.data


@dataclass(frozen=True, slots=True)
class FetchEnd(Message):
    TYPE: ClassVar[MessageType] = MessageType.FETCH_END
    fetch_id: int
    size: int


@dataclass(frozen=True, slots=True)
class FetchFail(Message):
    TYPE: ClassVar[MessageType] = MessageType.FETCH_FAIL
    fetch_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class FetchCancel(Message):
    TYPE: ClassVar[MessageType] = MessageType.FETCH_CANCEL
    fetch_id: int


@dataclass(frozen=True, slots=True)
class Report(Message):
    """A destination's state change. ``seq`` grows at ``origin``, the node
    that made the change (the destination itself unless said otherwise), so a
    repeated or reordered report changes nothing upstream. ``sig`` is the
    origin's signature over every other field (version 3), so relays forward
    reports unchanged and cannot forge one."""

    TYPE: ClassVar[MessageType] = MessageType.REPORT
    report_id: str
    job: Name
    node: Name
    state: str
    seq: int
    detail: str = ""
    package: PackageId | None = None
    time: float = 0.0
    origin: Name | None = None
    sig: bytes = field(default=b"", repr=False)


@dataclass(frozen=True, slots=True)
class ReportAck(Message):
    TYPE: ClassVar[MessageType] = MessageType.REPORT_ACK
    report_id: str


@dataclass(frozen=True, slots=True)
class Topology(Message):
    """The subtree below a relay: each node's own signed attach claim (which
    carries its role and its parent), forwarded unchanged (version 3).

    With ``reset`` (the default) ``nodes`` replaces everything the parent
    routed through this relay; without it, ``nodes`` are added (or their
    role updated) and ``removed`` are taken away. A relay sends its whole
    subtree as one message with ``reset`` followed by additions, then only
    changes. At most ``MAX_TOPOLOGY_BATCH`` names per message (``nodes``
    and ``removed`` together), so a subtree of any size fits."""

    TYPE: ClassVar[MessageType] = MessageType.TOPOLOGY
    nodes: dict[Name, bytes]
    removed: list[Name] = field(default_factory=list)
    reset: bool = True


@dataclass(frozen=True, slots=True)
class Holdings(Message):
    """What a relay keeps in its cache, package id to expiry (epoch seconds);
    replaces the last."""

    TYPE: ClassVar[MessageType] = MessageType.HOLDINGS
    packages: dict[PackageId, float]


@dataclass(frozen=True, slots=True)
class Presence(Message):
    """Which nodes below a relay are connected now (protocol version 2).

    ``online`` maps each node that came online to its own signed attach
    claim, which names the relay or node it is directly connected to
    (version 3: a bare parent name before); ``software`` gives, for nodes in ``online``, what
    they said in HELLO.software; ``offline`` lists nodes that went away. With
    ``reset`` the parent first forgets every node it knew online through this
    relay: a relay sends its whole connected subtree that way on each new
    session, then only changes. At most ``MAX_PRESENCE_BATCH`` names per
    message."""

    TYPE: ClassVar[MessageType] = MessageType.PRESENCE
    online: dict[Name, bytes] = field(default_factory=dict)
    offline: list[Name] = field(default_factory=list)
    software: dict[Name, str] = field(default_factory=dict)
    reset: bool = False


@dataclass(frozen=True, slots=True)
class Revoked(Message):
    """Every revoked node name, so a relay refuses them too; replaces the
    last list. A list longer than ``MAX_REVOKED_BATCH`` goes as several
    messages in a row, each but the last with ``more`` set; the receiver
    replaces its list once the last one is in."""

    TYPE: ClassVar[MessageType] = MessageType.REVOKED
    nodes: list[Name]
    more: bool = False
    SPARSE: ClassVar[frozenset[str]] = frozenset({"more"})


@dataclass(frozen=True, slots=True)
class JobCancel(Message):
    TYPE: ClassVar[MessageType] = MessageType.JOB_CANCEL
    job: Name
    destinations: list[Name]


@dataclass(frozen=True, slots=True)
class Ping(Message):
    TYPE: ClassVar[MessageType] = MessageType.PING
    nonce: int


@dataclass(frozen=True, slots=True)
class Pong(Message):
    TYPE: ClassVar[MessageType] = MessageType.PONG
    nonce: int


@dataclass(frozen=True, slots=True)
class Error(Message):
    """Says why the sender is closing the connection; nothing follows it."""

    TYPE: ClassVar[MessageType] = MessageType.ERROR
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Goodbye(Message):
    TYPE: ClassVar[MessageType] = MessageType.GOODBYE
    reason: str = ""


MESSAGE_CLASSES: dict[MessageType, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Welcome,
        JobNotice,
        JobAnnounce,
        PendingQuery,
        PendingDone,
        Fetch,
        Chunk,
        FetchEnd,
        FetchFail,
        FetchCancel,
        Report,
        ReportAck,
        Topology,
        Holdings,
        Revoked,
        Presence,
        JobCancel,
        Ping,
        Pong,
        Error,
        Goodbye,
    )
}

# The field that receives the raw payload on decode, per payload-carrying type.
_PAYLOAD_FIELD = {
    MessageType.JOB_NOTICE: "manifest",
    MessageType.JOB_ANNOUNCE: "manifest",
    MessageType.CHUNK: "data",
}


def _check(value: Any, tp: Any, where: str) -> None:
    """Raise RemoteProtocolError unless ``value`` fits annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, pattern = typing.get_args(tp)[:2]
        _check(value, base, where)
        if not _CHECKERS[pattern](value):
            raise RemoteProtocolError(f"{where}: unsafe name {value!r}")
        return
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                _check(value, option, where)
                return
            except RemoteProtocolError:
                continue
        raise RemoteProtocolError(f"{where}: unexpected {type(value).__name__}")
    if tp is type(None):
        ok = value is None
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif origin is list:
        if not isinstance(value, list):
            raise RemoteProtocolError(f"{where}: expected a list")
        (item,) = typing.get_args(tp)
        for i, v in enumerate(value):
            _check(v, item, f"{where}[{i}]")
        return
    elif origin is dict:
        if not isinstance(value, dict):
            raise RemoteProtocolError(f"{where}: expected a map")
        key_tp, val_tp = typing.get_args(tp)
        for k, v in value.items():
            _check(k, key_tp, f"{where} key")
            _check(v, val_tp, f"{where}[{k!r}]")
        return
    elif tp is memoryview:
        ok = isinstance(value, memoryview)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise RemoteProtocolError(f"{where}: expected {getattr(tp, '__name__', tp)}")


#: The field annotations ``from_wire`` checks each message type against,
#: filled in on the type's first decode (``_field_types``).
_FIELD_TYPES: dict[MessageType, dict[str, Any]] = {}


def _field_types(mtype: MessageType) -> dict[str, Any]:
    """The annotations of ``mtype``'s fields, resolved on its first decode:
    resolving the string annotations of every class was most of what
    importing this module cost, and a one-shot program such as ``rdsft -a``
    decodes only a few of the types. (Two threads decoding a type first at
    once both resolve it, to the same value.)"""
    hints = _FIELD_TYPES.get(mtype)
    if hints is None:
        cls = MESSAGE_CLASSES[mtype]
        resolved = typing.get_type_hints(cls, include_extras=True)
        hints = _FIELD_TYPES[mtype] = {f.name: resolved[f.name] for f in dataclasses.fields(cls)}
    return hints


def to_wire(msg: Message) -> list[Any]:
    """The msgpack-ready header form ``[tag, fields]``, payload excluded."""
    skip = _PAYLOAD_FIELD.get(msg.TYPE)
    fields = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg) if f.name != skip}
    for name in msg.SPARSE:
        if not fields[name]:  # at its default (0, empty): left out
            del fields[name]
    return [int(msg.TYPE), fields]


def from_wire(obj: Any, payload: bytes | memoryview) -> Message:
    """Build a message from a decoded header and its payload, checking every
    field; anything unexpected is the peer's fault."""
    if not (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[1], dict)):
        raise RemoteProtocolError("header is not [tag, fields]")
    tag, fields = obj
    try:
        # Only a msgpack integer is a tag: True and 1.0 compare equal to 1.
        if type(tag) is not int:
            raise ValueError
        mtype = MessageType(tag)
    except ValueError:
        raise RemoteProtocolError(f"unknown message type {tag!r}") from None
    cls = MESSAGE_CLASSES[mtype]
    hints = _field_types(mtype)
    payload_field = _PAYLOAD_FIELD.get(mtype)
    if payload and payload_field is None:
        raise RemoteProtocolError(f"{mtype.name} carries no payload")
    kwargs: dict[str, Any] = {}
    for name, value in fields.items():
        if not isinstance(name, str) or name not in hints or name == payload_field:
            raise RemoteProtocolError(f"{mtype.name}: unknown field {name!r}")
        _check(value, hints[name], f"{mtype.name}.{name}")
        kwargs[name] = value
    if payload_field is not None:
        kwargs[payload_field] = payload
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise RemoteProtocolError(f"{mtype.name}: {exc}", ErrorCode.PROTOCOL) from None
