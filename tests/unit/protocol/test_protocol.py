"""Protocol tests on bytes alone: no sockets, no asyncio.

Everything here drives ``protocol.Connection`` / ``protocol.FrameDecoder``
with byte strings and checks the typed messages, states and errors that come
back. Hostile input is built either with the real encoder (messages carrying
bad values; the sender does not validate) or by hand with ``msgpack`` when the
frame itself must be malformed.
"""

from __future__ import annotations

import itertools
import random
import struct
from collections.abc import Iterable, Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (
    MAGIC,
    MAX_HEADER,
    MAX_PAYLOAD,
    NEED_DATA,
    PROTOCOL_VERSION,
    TRANSITIONS,
    Chunk,
    Connection,
    ConnectionClosed,
    Error,
    ErrorCode,
    Fetch,
    FetchCancel,
    FetchEnd,
    FetchFail,
    FrameDecoder,
    Goodbye,
    Hello,
    Holdings,
    JobAnnounce,
    JobCancel,
    JobNotice,
    LocalProtocolError,
    Message,
    MessageType,
    PendingDone,
    PendingQuery,
    Ping,
    Pong,
    Presence,
    ProtocolError,
    RemoteProtocolError,
    Report,
    ReportAck,
    Revoked,
    Side,
    State,
    Topology,
    Welcome,
    encode,
    is_destination,
    is_package_id,
    is_safe_name,
)
from protocol.connection import MAX_OPEN_FETCHES
from protocol.messages import from_wire, to_wire

C, P = Side.CHILD, Side.PARENT
PREFIX = struct.Struct(">II")

# -- helpers ------------------------------------------------------------------


def wire(msg: Message) -> bytes:
    """The frame for ``msg`` as one byte string (no preamble)."""
    return b"".join(bytes(b) for b in encode(msg))


def sent(buffers: Iterable[bytes | memoryview]) -> bytes:
    return b"".join(bytes(b) for b in buffers)


def raw_frame(header: Any, payload: bytes = b"", *, packed: bytes | None = None) -> bytes:
    """A frame around an arbitrary header object (or pre-packed header bytes)."""
    h = msgpack.packb(header, use_bin_type=True) if packed is None else packed
    return PREFIX.pack(len(h), len(payload)) + h + payload


def decode_all(data: bytes) -> list[Message]:
    dec = FrameDecoder()
    dec.feed(data)
    out = []
    while (msg := dec.next_message()) is not None:
        out.append(msg)
    assert dec.buffered == 0
    return out


HELLO = Hello(node="relay-a", role="relay", software="rdsd test")
WELCOME = Welcome(node="server", role="server", time=1_700_000_000.25)


def open_parent(**kw: Any) -> Connection:
    """A parent-side connection that has received HELLO and answered WELCOME."""
    conn = Connection(P, **kw)
    conn.receive_data(MAGIC + wire(HELLO))
    assert conn.next_event() == HELLO
    conn.send(WELCOME)
    assert conn.state is State.OPEN
    return conn


def open_child(**kw: Any) -> Connection:
    """A child-side connection that has sent HELLO and received WELCOME."""
    conn = Connection(C, **kw)
    conn.send(HELLO)
    conn.receive_data(MAGIC + wire(WELCOME))
    assert conn.next_event() == WELCOME
    assert conn.state is State.OPEN
    return conn


def feed_open(receiver: Side, data: bytes) -> Message | Any:
    """Feed ``data`` (frames, no preamble) to an OPEN connection of side
    ``receiver`` and return its next event (or raise)."""
    conn = open_parent() if receiver is P else open_child()
    conn.receive_data(data)
    return conn.next_event()


# One minimal valid instance of every message type.
SAMPLES: dict[MessageType, Message] = {
    MessageType.HELLO: Hello(node="client1", role="client"),
    MessageType.WELCOME: Welcome(node="server", role="server"),
    MessageType.JOB_NOTICE: JobNotice(
        job="job1", type="install", package="app-1.0", destinations=["client1"], manifest=b"m"
    ),
    MessageType.PENDING_QUERY: PendingQuery(),
    MessageType.PENDING_DONE: PendingDone(jobs=["job1"]),
    MessageType.FETCH: Fetch(fetch_id=1, package="app-1.0"),
    MessageType.CHUNK: Chunk(fetch_id=1, offset=0, data=b"abc"),
    MessageType.FETCH_END: FetchEnd(fetch_id=1, size=3),
    MessageType.FETCH_FAIL: FetchFail(fetch_id=1, reason="gone"),
    MessageType.FETCH_CANCEL: FetchCancel(fetch_id=1),
    MessageType.REPORT: Report(report_id="r1", job="job1", node="client1", state="waiting", seq=1),
    MessageType.REPORT_ACK: ReportAck(report_id="r1"),
    MessageType.TOPOLOGY: Topology(nodes={"client1": b"client"}),
    MessageType.HOLDINGS: Holdings(packages={"app-1.0": 1.9e9}),
    MessageType.JOB_CANCEL: JobCancel(job="job1", destinations=["client1"]),
    MessageType.REVOKED: Revoked(nodes=["client9"]),
    MessageType.PRESENCE: Presence(online={"client1": b"relay-a"}),
    MessageType.JOB_ANNOUNCE: JobAnnounce(
        job="job2", type="install", package="app-1.0", destinations=["client1"], origin="relay-a"
    ),
    MessageType.PING: Ping(nonce=1),
    MessageType.PONG: Pong(nonce=1),
    MessageType.ERROR: Error(code=int(ErrorCode.PROTOCOL), reason="bad"),
    MessageType.GOODBYE: Goodbye(),
}

# The same, with every optional field given a non-default value.
FULL: list[Message] = [
    Hello(node="relay-a", role="relay", purpose="query", proto=1, software="rdsd 0.1"),
    Welcome(node="server", role="server", proto=1, time=1_700_000_000.5),
    JobNotice(
        job="job-42",
        type="offer",
        package="my-app-1.2.3",
        destinations=["c1", "c2", "relay.b"],
        at=1_800_000_000.0,
        origin="relay-a",
        generation=3,
        manifest=bytes(range(256)) * 3,
    ),
    JobNotice(job="j", type="install", package="a-1", destinations=[]),
    PendingDone(jobs=[]),
    Fetch(fetch_id=2**40, package="app-1.0", offset=1 << 20),
    Chunk(fetch_id=7, offset=3 << 20, data=b"\x00" * 1000 + MAGIC + b"\xff"),
    FetchEnd(fetch_id=7, size=0),
    FetchFail(fetch_id=7, reason="disk full: ünïcode ✓"),
    Report(
        report_id="r-9",
        job="job-42",
        node="c1",
        state="failed",
        seq=2**62,
        detail="exit status 3",
        package="my-app-1.2.3",
        time=1_700_000_001.0,
        origin="relay-a",
    ),
    Topology(nodes={}),
    Topology(nodes={"c1": b"client", "relay.b": b"relay"}),
    Holdings(packages={"a-1": 0, "b-2.0": 1.5e9}),
    Revoked(nodes=[]),
    Presence(),
    Presence(
        online={"c1": b"relay-a", "c2": b"relay.b"},
        offline=["c3"],
        software={"c1": "rdsd/0.1.0"},
        reset=True,
    ),
    Revoked(nodes=["c1", "relay.b"]),
    JobAnnounce(
        job="relay-a.7",
        type="offer",
        package="tool-2",
        destinations=["c1", "c2"],
        origin="relay-a",
        at=1_800_000_000.0,
        manifest=b"\x92" + bytes(100),
    ),
    Ping(nonce=-(2**63)),
    Pong(nonce=2**64 - 1),
    Error(code=99, reason=""),
    Goodbye(reason="shutting down"),
]


def test_samples_cover_every_type() -> None:
    assert set(SAMPLES) == set(MessageType)
    for mtype, msg in SAMPLES.items():
        assert msg.TYPE is mtype


# -- 1. a full conversation, fed whole, byte by byte, and split at random -------

rng = random.Random(1234)
MANIFEST = rng.randbytes(700)
DATA = rng.randbytes(2500) + MAGIC + PREFIX.pack(1, 1)  # payload that looks like framing
PKG = "app-1.0"

SCRIPT: list[tuple[Side, Message]] = [
    (C, HELLO),
    (P, WELCOME),
    (C, PendingQuery()),
    (
        P,
        JobNotice(
            job="job-1",
            type="transfer",
            package=PKG,
            destinations=["relay-a", "client7"],
            at=None,
            origin="server",
            generation=1,
            manifest=MANIFEST,
        ),
    ),
    (P, PendingDone(jobs=["job-1"])),
    (C, Fetch(fetch_id=1, package=PKG, offset=0)),
    (P, Chunk(fetch_id=1, offset=0, data=DATA[:1000])),
    (P, Chunk(fetch_id=1, offset=1000, data=memoryview(DATA)[1000:2000])),
    (P, Chunk(fetch_id=1, offset=2000, data=DATA[2000:])),
    (P, FetchEnd(fetch_id=1, size=len(DATA))),
    # a resumed fetch: starts at a chunk boundary
    (C, Fetch(fetch_id=2, package=PKG, offset=2000)),
    (P, Chunk(fetch_id=2, offset=2000, data=DATA[2000:])),
    (P, FetchEnd(fetch_id=2, size=len(DATA))),
    # a cancelled fetch: a chunk still in flight, then FETCH_FAIL closes it
    (C, Fetch(fetch_id=3, package=PKG)),
    (P, Chunk(fetch_id=3, offset=0, data=DATA[:1000])),
    (C, FetchCancel(fetch_id=3)),
    (P, FetchFail(fetch_id=3, reason="cancelled")),
    (C, Report(report_id="r-1", job="job-1", node="relay-a", state="stored", seq=1, package=PKG)),
    (P, ReportAck(report_id="r-1")),
    (C, Topology(nodes={"client7": b"client", "client8": b"client"})),
    (C, Holdings(packages={PKG: 1_900_000_000.0})),
    (C, Presence(online={"client7": b"relay-a"}, software={"client7": "rdsd/0.1.0"}, reset=True)),
    (C, Presence(offline=["client7"])),
    (
        C,
        JobAnnounce(
            job="relay-a.1",
            type="install",
            package=PKG,
            destinations=["client7"],
            origin="relay-a",
            manifest=MANIFEST,
        ),
    ),
    (P, ReportAck(report_id="job:relay-a.1")),
    (C, Ping(nonce=1)),
    (P, Pong(nonce=1)),
    (P, Ping(nonce=77)),
    (C, Pong(nonce=77)),
    (P, JobCancel(job="job-1", destinations=["client7"])),
    (P, Revoked(nodes=["client8"])),
    (C, Goodbye(reason="shutting down")),
]


def record() -> tuple[bytes, bytes]:
    """Run SCRIPT through two connections; the bytes each way."""
    child, parent = Connection(C), Connection(P)
    streams = {C: bytearray(), P: bytearray()}
    for side, msg in SCRIPT:
        sender, receiver = (child, parent) if side is C else (parent, child)
        data = sent(sender.send(msg))
        streams[side] += data
        receiver.receive_data(data)
        assert receiver.next_event() == msg
    return bytes(streams[C]), bytes(streams[P])


C2P, P2C = record()


def replay(c2p: Iterable[bytes], p2c: Iterable[bytes]) -> tuple[list[Message], list[bytes]]:
    """Replay SCRIPT with fresh connections, delivering each direction's bytes
    in the given pieces, and pulling one event per message, lazily: a piece may
    hold the end of one frame and the start of several more. Returns the
    messages received (in script order) and the payload bytes seen."""
    child, parent = Connection(C), Connection(P)
    pieces: dict[int, Iterator[bytes]] = {id(parent): iter(c2p), id(child): iter(p2c)}
    got: list[Message] = []
    payloads: list[bytes] = []
    for side, msg in SCRIPT:
        sender, receiver = (child, parent) if side is C else (parent, child)
        sender.send(msg)
        while (event := receiver.next_event()) is NEED_DATA:
            receiver.receive_data(next(pieces[id(receiver)]))
        assert isinstance(event, Message), event
        got.append(event)
        payloads.append(bytes(event.payload))
    for conn in (child, parent):
        assert next(pieces[id(conn)], None) is None, "bytes left over"
        conn.receive_data(b"")
        assert conn.next_event() == ConnectionClosed(graceful=True)
        assert conn.state is State.CLOSED
        assert conn.open_fetches == {}
    return got, payloads


def check_replay(got: list[Message], payloads: list[bytes]) -> None:
    assert got == [msg for _, msg in SCRIPT]
    assert payloads == [bytes(msg.payload) for _, msg in SCRIPT]
    fetch1 = [
        p for e, p in zip(got, payloads, strict=True) if isinstance(e, Chunk) and e.fetch_id == 1
    ]
    assert b"".join(fetch1) == DATA
    assert got[3].payload == MANIFEST


def split(data: bytes, points: Iterable[int]) -> list[bytes]:
    cuts = sorted({p for p in points if 0 < p < len(data)})
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def test_conversation_uses_every_type_but_error() -> None:
    assert {m.TYPE for _, m in SCRIPT} == set(MessageType) - {MessageType.ERROR}
    assert C2P.startswith(MAGIC)
    assert P2C.startswith(MAGIC)


def test_conversation_fed_whole() -> None:
    check_replay(*replay([C2P], [P2C]))


def test_conversation_fed_one_byte_at_a_time() -> None:
    child, parent = Connection(C), Connection(P)
    streams = {id(parent): iter(C2P), id(child): iter(P2C)}
    for side, msg in SCRIPT:
        sender, receiver = (child, parent) if side is C else (parent, child)
        sender.send(msg)
        fed = 0
        while (event := receiver.next_event()) is NEED_DATA:
            receiver.receive_data(bytes([next(streams[id(receiver)])]))
            fed += 1
        assert event == msg
        assert bytes(event.payload) == bytes(msg.payload)
        # The message popped out on its very last byte, not before.
        assert fed == len(wire(msg)) + (len(MAGIC) if msg in (HELLO, WELCOME) else 0)
    assert next(streams[id(parent)], None) is None
    assert next(streams[id(child)], None) is None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.integers(0, len(C2P)), max_size=60),
    st.lists(st.integers(0, len(P2C)), max_size=60),
)
def test_conversation_split_at_random_points(c2p_cuts: list[int], p2c_cuts: list[int]) -> None:
    check_replay(*replay(split(C2P, c2p_cuts), split(P2C, p2c_cuts)))


def test_conversation_bytes_are_deterministic() -> None:
    assert record() == (C2P, P2C)


# -- 2. every message type round-trips ----------------------------------------


@pytest.mark.parametrize("msg", [*SAMPLES.values(), *FULL], ids=lambda m: m.TYPE.name)
def test_round_trip(msg: Message) -> None:
    (decoded,) = decode_all(wire(msg))
    assert decoded == msg
    assert type(decoded) is type(msg)
    assert bytes(decoded.payload) == bytes(msg.payload)
    assert from_wire(to_wire(msg), bytes(msg.payload)) == msg


def test_round_trip_many_frames_in_one_buffer() -> None:
    msgs = [*SAMPLES.values(), *FULL]
    assert decode_all(b"".join(wire(m) for m in msgs)) == msgs


def test_payload_is_not_in_the_header() -> None:
    chunk = Chunk(fetch_id=1, offset=0, data=b"PAYLOAD")
    buffers = encode(chunk)
    assert len(buffers) == 2
    assert buffers[1] is chunk.data  # handed over as is, not copied
    hlen, plen = PREFIX.unpack_from(buffers[0])
    assert (hlen, plen) == (len(bytes(buffers[0])) - 8, 7)
    assert msgpack.unpackb(bytes(buffers[0])[8:]) == [7, {"fetch_id": 1, "offset": 0}]
    assert len(encode(Ping(nonce=1))) == 1


def test_memoryview_payload_is_sent_untouched() -> None:
    data = bytearray(b"x" * 100)
    chunk = Chunk(fetch_id=1, offset=0, data=memoryview(data)[10:20])
    (decoded,) = decode_all(wire(chunk))
    assert decoded == Chunk(fetch_id=1, offset=0, data=b"x" * 10)


# -- 3. size caps: refused from the 8-byte prefix alone ------------------------


@pytest.mark.parametrize(
    ("hlen", "plen"),
    [(MAX_HEADER + 1, 0), (2**32 - 1, 0), (0, 0), (0, 10), (10, MAX_PAYLOAD + 1), (10, 2**32 - 1)],
)
def test_caps_refused_from_the_prefix(hlen: int, plen: int) -> None:
    conn = Connection(P)
    conn.receive_data(MAGIC + PREFIX.pack(hlen, plen)[:7])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(PREFIX.pack(hlen, plen)[7:])  # the body never arrives
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE


def test_caps_apply_in_open_state_too() -> None:
    conn = open_child()
    conn.receive_data(PREFIX.pack(10, MAX_PAYLOAD + 1))
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE


def test_limits_themselves_are_allowed() -> None:
    # Once the session is open: before it, the pre-session cap applies.
    for hlen, plen in [(MAX_HEADER, 0), (1, MAX_PAYLOAD)]:
        conn = open_child()
        conn.receive_data(PREFIX.pack(hlen, plen))
        assert conn.next_event() is NEED_DATA


def test_custom_payload_cap() -> None:
    conn = Connection(P, max_payload=1024)
    conn.receive_data(MAGIC + PREFIX.pack(10, 1025))
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    dec = FrameDecoder(max_payload=1024)
    dec.feed(PREFIX.pack(10, 1024))
    assert dec.next_message() is None


def test_encoder_refuses_oversized_frames() -> None:
    with pytest.raises(LocalProtocolError):
        encode(Hello(node="a", role="x" * MAX_HEADER))
    with pytest.raises(LocalProtocolError):
        encode(Chunk(fetch_id=1, offset=0, data=b"x" * 11), max_payload=10)


# -- 4. malformed frames and messages ----------------------------------------

GOOD_PING = msgpack.packb([15, {"nonce": 1}])

MALFORMED: dict[str, bytes] = {
    "never-used byte": raw_frame(None, packed=b"\xc1"),
    "truncated msgpack": raw_frame(None, packed=GOOD_PING[:-1]),
    "trailing bytes in header": raw_frame(None, packed=GOOD_PING + b"\x00"),
    "invalid utf-8 str": raw_frame(None, packed=b"\x92\x0f\x81\xa5nonce\xa2\xff\xfe"),
    "int map key": raw_frame([15, {1: 1}]),
    "not a list": raw_frame({"nonce": 1}),
    "bare int": raw_frame(15),
    "one element": raw_frame([15]),
    "three elements": raw_frame([15, {"nonce": 1}, None]),
    "fields not a map": raw_frame([15, [1]]),
    "fields nil": raw_frame([15, None]),
    "unknown tag 0": raw_frame([0, {}]),
    "unknown tag 99": raw_frame([99, {}]),
    "negative tag": raw_frame([-15, {"nonce": 1}]),
    "tag as str": raw_frame(["PING", {"nonce": 1}]),
    "tag as bool": raw_frame([True, {"node": "a", "role": "client"}]),
    "tag as float": raw_frame([15.0, {"nonce": 1}]),
    "unknown field": raw_frame([15, {"nonce": 1, "extra": 2}]),
    "bytes field name": raw_frame([15, {b"nonce": 1}]),
    "payload field in header": raw_frame([7, {"fetch_id": 1, "offset": 0, "data": b"x"}]),
    "nonce as str": raw_frame([15, {"nonce": "1"}]),
    "nonce as bool": raw_frame([15, {"nonce": True}]),
    "nonce as float": raw_frame([15, {"nonce": 1.0}]),
    "nonce as nil": raw_frame([15, {"nonce": None}]),
    "fetch_id as str": raw_frame([6, {"fetch_id": "1", "package": "app-1.0"}]),
    "fetch_id as bool": raw_frame([6, {"fetch_id": False, "package": "app-1.0"}]),
    "offset as float": raw_frame([6, {"fetch_id": 1, "package": "app-1.0", "offset": 0.5}]),
    "package as bytes": raw_frame([6, {"fetch_id": 1, "package": b"app-1.0"}]),
    "jobs not a list": raw_frame([5, {"jobs": "job1"}]),
    "jobs item int": raw_frame([5, {"jobs": [1]}]),
    "nodes not a map": raw_frame([13, {"nodes": ["a"]}]),
    "role not a str": raw_frame([13, {"nodes": {"a": 1}}]),
    "expiry as str": raw_frame([19, {"packages": {"app-1.0": "soon"}}]),
    "expiry as bool": raw_frame([19, {"packages": {"app-1.0": True}}]),
    "ext type": raw_frame([15, {"nonce": msgpack.ExtType(1, b"x")}]),
    "missing nonce": raw_frame([15, {}]),
    "missing package": raw_frame([6, {"fetch_id": 1}]),
    "missing report seq": raw_frame(
        [11, {"report_id": "r", "job": "j", "node": "n", "state": "waiting"}]
    ),
    "payload on PING": raw_frame([15, {"nonce": 1}], b"x"),
    "payload on REPORT_ACK": raw_frame([12, {"report_id": "r"}], b"\x00"),
}


@pytest.mark.parametrize("frame", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_frame_refused(frame: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        feed_open(P, frame)
    assert info.value.code is ErrorCode.PROTOCOL


@pytest.mark.parametrize("tag", [True, 1.0], ids=repr)
def test_tag_must_be_an_int(tag: object) -> None:
    # True == 1.0 == 1 == HELLO in Python; on the wire only an integer is a tag.
    conn = Connection(P)
    conn.receive_data(MAGIC + raw_frame([tag, {"node": "c1", "role": "client"}]))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_malformed_first_frame_refused() -> None:
    conn = Connection(P)
    conn.receive_data(MAGIC + MALFORMED["unknown field"])
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


@pytest.mark.parametrize(
    "preamble",
    [b"GET / HTTP/1.1\r\n", b"\x16\x03\x01\x02\x00", b"RDS\x02", b"RDX", b"rds\x01", b"\x00"],
)
def test_bad_preamble_refused(preamble: bytes) -> None:
    conn = Connection(P)
    conn.receive_data(preamble + wire(HELLO))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_bad_preamble_refused_on_first_wrong_byte() -> None:
    conn = Connection(P)
    conn.receive_data(b"R")
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"D")
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"X")
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_frame_without_preamble_refused() -> None:
    conn = Connection(P)
    conn.receive_data(wire(HELLO))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_child_checks_parent_preamble() -> None:
    conn = Connection(C)
    conn.send(HELLO)
    conn.receive_data(wire(WELCOME))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


# -- 5. hostile names ---------------------------------------------------------

BAD_NAMES = ["..", ".", "...", "a/b", "/etc", "a\x00b", "", "x" * 65, "a\\b", "a b", "é", "a\nb"]
BAD_PACKAGES = [
    "app",
    "app/1-2",
    "app-1/2",
    "../x-1",
    "..-1",
    "a-..",
    "a--1",
    "-1",
    "a-",
    "",
    "a\x00-1",
    "a-1\x00",
    "x" * 65 + "-1",
    "app-" + "1" * 65,
]


def test_name_checks() -> None:
    for good in ["client1", "a", "x" * 64, "relay.b", "c-1_2", "a.", ".a", "-"]:
        assert is_safe_name(good), good
        assert is_destination(good), good
    for bad in BAD_NAMES:
        assert not is_safe_name(bad), bad
        assert not is_destination(bad), bad
        assert not is_destination("group:" + bad), bad
    assert is_destination("group:web")
    assert not is_destination("group:")
    assert not is_destination("groups:web")
    for good in ["app-1.0", "my-app-1.2.3", "a-1", "x" * 64 + "-" + "1" * 64, "a.b-c.d"]:
        assert is_package_id(good), good
    for bad in BAD_PACKAGES:
        assert not is_package_id(bad), bad


def _hostile_name_messages(bad: str) -> list[tuple[Side, Message]]:
    """(receiver, message) pairs where ``bad`` sits in a name field."""
    return [
        (P, Report(report_id="r", job="j", node=bad, state="waiting", seq=1)),
        (P, Report(report_id="r", job=bad, node="n", state="waiting", seq=1)),
        (P, Report(report_id="r", job="j", node="n", state="waiting", seq=1, origin=bad)),
        (P, Topology(nodes={bad: b"client"})),
        (C, JobNotice(job="j", type="install", package="a-1", destinations=[bad])),
        (C, JobNotice(job="j", type="install", package="a-1", destinations=["ok", bad])),
        (C, JobNotice(job=bad, type="install", package="a-1", destinations=["ok"])),
        (C, JobNotice(job="j", type="install", package="a-1", destinations=[], origin=bad)),
        (C, JobCancel(job="j", destinations=[bad])),
        (C, Revoked(nodes=[bad])),
        (C, Revoked(nodes=["ok", bad])),
        (P, JobAnnounce(job="j", type="install", package="a-1", destinations=[bad], origin="r")),
        (P, JobAnnounce(job="j", type="install", package="a-1", destinations=[], origin=bad)),
        (P, JobAnnounce(job=bad, type="install", package="a-1", destinations=[], origin="r")),
        (C, PendingDone(jobs=[bad])),
    ]


@pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
def test_hostile_node_names_refused(bad: str) -> None:
    conn = Connection(P)
    conn.receive_data(MAGIC + wire(Hello(node=bad, role="client")))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    conn = Connection(C)
    conn.send(HELLO)
    conn.receive_data(MAGIC + wire(Welcome(node=bad, role="server")))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    for receiver, msg in _hostile_name_messages(bad):
        with pytest.raises(RemoteProtocolError):
            feed_open(receiver, wire(msg))


@pytest.mark.parametrize("bad", BAD_PACKAGES, ids=repr)
def test_hostile_package_ids_refused(bad: str) -> None:
    for receiver, msg in [
        (P, Fetch(fetch_id=1, package=bad)),
        (P, Holdings(packages={bad: 1.0})),
        (P, Report(report_id="r", job="j", node="n", state="installed", seq=1, package=bad)),
        (C, JobNotice(job="j", type="install", package=bad, destinations=["c"])),
        (P, JobAnnounce(job="j", type="install", package=bad, destinations=[], origin="r")),
    ]:
        with pytest.raises(RemoteProtocolError):
            feed_open(receiver, wire(msg))


# -- 6. the state machine -----------------------------------------------------


def test_child_may_not_send_welcome() -> None:
    for conn in (Connection(C), open_child()):
        with pytest.raises(LocalProtocolError):
            conn.send(WELCOME)
    conn = Connection(C)
    conn.send(HELLO)
    with pytest.raises(LocalProtocolError):
        conn.send(WELCOME)


def test_parent_may_not_send_fetch() -> None:
    with pytest.raises(LocalProtocolError):
        open_parent().send(Fetch(fetch_id=1, package="app-1.0"))


def test_parent_may_not_speak_first_except_error_or_goodbye() -> None:
    for mtype, msg in SAMPLES.items():
        conn = Connection(P)
        if mtype in (MessageType.ERROR, MessageType.GOODBYE):
            conn.send(msg)
            assert conn.state is State.CLOSED
        else:
            with pytest.raises(LocalProtocolError):
                conn.send(msg)


@pytest.mark.parametrize(
    "mtype",
    [
        t
        for t in MessageType
        if t not in (MessageType.HELLO, MessageType.ERROR, MessageType.GOODBYE)
    ],
)
def test_nothing_but_hello_first_from_child(mtype: MessageType) -> None:
    conn = Connection(P)
    conn.receive_data(MAGIC + wire(SAMPLES[mtype]))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    child = Connection(C)
    with pytest.raises(LocalProtocolError):
        child.send(SAMPLES[mtype])


def test_nothing_before_welcome() -> None:
    conn = Connection(P)
    conn.receive_data(MAGIC + wire(HELLO) + wire(Ping(nonce=1)))
    assert conn.next_event() == HELLO
    with pytest.raises(RemoteProtocolError):
        conn.next_event()  # the child may not talk before WELCOME
    child = Connection(C)
    child.send(HELLO)
    with pytest.raises(LocalProtocolError):
        child.send(Ping(nonce=1))


def test_second_hello_refused() -> None:
    with pytest.raises(RemoteProtocolError):
        feed_open(P, wire(HELLO))
    with pytest.raises(LocalProtocolError):
        open_child().send(HELLO)


def test_received_disallowed_messages() -> None:
    for receiver, msg in [
        (P, WELCOME),
        (P, Chunk(fetch_id=1, offset=0, data=b"x")),
        (P, JobNotice(job="j", type="install", package="a-1", destinations=[])),
        (P, ReportAck(report_id="r")),
        (P, Revoked(nodes=["c1"])),
        (C, Fetch(fetch_id=1, package="app-1.0")),
        (C, Report(report_id="r", job="j", node="n", state="waiting", seq=1)),
        (C, Topology(nodes={})),
        (C, HELLO),
        (C, JobAnnounce(job="j", type="install", package="a-1", destinations=[], origin="r")),
    ]:
        with pytest.raises(RemoteProtocolError):
            feed_open(receiver, wire(msg))


@pytest.mark.parametrize("closer", [Goodbye(reason="bye"), Error(code=7, reason="stop")])
def test_nothing_after_goodbye_or_error(closer: Message) -> None:
    # received
    conn = open_parent()
    conn.receive_data(wire(closer) + wire(Ping(nonce=1)))
    assert conn.next_event() == closer
    assert conn.state is State.CLOSED
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    # and this side may not send after the peer's GOODBYE/ERROR either
    conn = open_parent()
    conn.receive_data(wire(closer))
    conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.send(Ping(nonce=1))
    # sent
    conn = open_child()
    conn.send(closer)
    assert conn.state is State.CLOSED
    for msg in (Ping(nonce=2), Goodbye(), Error(code=1, reason="again")):
        with pytest.raises(LocalProtocolError):
            conn.send(msg)
    conn.receive_data(wire(Ping(nonce=3)))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_goodbye_and_error_allowed_in_every_live_state() -> None:
    for closer in (Goodbye(), Error(code=1, reason="x")):
        for conn in (Connection(C), open_child(), open_parent()):
            conn.send(closer)
            assert conn.state is State.CLOSED
        conn = Connection(C)
        conn.send(HELLO)
        conn.send(closer)
        assert conn.state is State.CLOSED
        conn = Connection(P)
        conn.receive_data(MAGIC + wire(HELLO))
        conn.next_event()
        conn.send(closer)  # refusing a HELLO
        assert conn.state is State.CLOSED


def test_remote_error_is_sticky() -> None:
    conn = open_parent()
    conn.receive_data(MALFORMED["unknown tag 99"])
    with pytest.raises(RemoteProtocolError) as first:
        conn.next_event()
    conn.receive_data(wire(Ping(nonce=1)))  # even good bytes do not revive it
    for _ in range(3):
        with pytest.raises(RemoteProtocolError) as again:
            conn.next_event()
        # The same error, as a fresh exception: the one kept holds no
        # traceback (which would hold the connection in a cycle).
        assert type(again.value) is type(first.value)
        assert str(again.value) == str(first.value)
        assert again.value.code is first.value.code
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def decode_error_frame(buffers: list[bytes | memoryview], receiver: Connection) -> Error:
    receiver.receive_data(sent(buffers))
    event = receiver.next_event()
    assert isinstance(event, Error)
    assert receiver.state is State.CLOSED
    return event


def test_send_error_in_open() -> None:
    parent = open_parent()
    parent.receive_data(MALFORMED["nonce as bool"])
    with pytest.raises(RemoteProtocolError) as info:
        parent.next_event()
    buffers = parent.send_error(info.value)
    assert parent.state is State.CLOSED
    err = decode_error_frame(buffers, open_child())
    assert err.code == ErrorCode.PROTOCOL
    assert "nonce" in err.reason
    assert parent.send_error(info.value) == []  # only once


def test_send_error_before_anything_was_exchanged() -> None:
    parent = Connection(P)
    parent.receive_data(b"GET / HTTP/1.1\r\n")
    with pytest.raises(RemoteProtocolError) as info:
        parent.next_event()
    assert parent.state is State.START
    buffers = parent.send_error(info.value)
    data = sent(buffers)
    assert data.startswith(MAGIC)
    # a child that has said HELLO, and one that has not even done that
    child = Connection(C)
    child.send(HELLO)
    assert decode_error_frame([data], child).reason == str(info.value)
    assert decode_error_frame([data], Connection(C)).code == ErrorCode.PROTOCOL


def test_send_error_frame_too_large_code() -> None:
    parent = Connection(P)
    parent.receive_data(MAGIC + PREFIX.pack(MAX_HEADER + 1, 0))
    with pytest.raises(RemoteProtocolError) as info:
        parent.next_event()
    err = decode_error_frame(parent.send_error(info.value), Connection(C))
    assert err.code == ErrorCode.FRAME_TOO_LARGE


def test_send_error_after_peer_closed_before_we_spoke() -> None:
    parent = Connection(P)
    parent.receive_data(MAGIC + wire(HELLO) + wire(Goodbye()))
    parent.next_event()
    parent.next_event()
    assert parent.state is State.CLOSED
    data = sent(parent.send_error(ProtocolError("late", ErrorCode.SHUTDOWN)))
    assert data.startswith(MAGIC)
    child = Connection(C)
    child.send(HELLO)
    assert decode_error_frame([data], child).code == ErrorCode.SHUTDOWN


def test_send_error_truncates_reason() -> None:
    parent = open_parent()
    err = decode_error_frame(parent.send_error(ProtocolError("x" * 5000)), open_child())
    assert len(err.reason) == 500


def test_preamble_sent_once() -> None:
    child = Connection(C)
    first = sent(child.send(HELLO))
    assert first == MAGIC + wire(HELLO)
    parent = Connection(P)
    parent.receive_data(first)
    parent.next_event()
    assert sent(parent.send(WELCOME)) == MAGIC + wire(WELCOME)
    assert sent(parent.send(Ping(nonce=1))) == wire(Ping(nonce=1))


def test_refused_send_leaves_connection_unchanged() -> None:
    child = Connection(C)
    with pytest.raises(LocalProtocolError):
        child.send(Hello(node="c", role="x" * (MAX_HEADER + 1)))
    assert child.state is State.START
    assert sent(child.send(HELLO)).startswith(MAGIC)

    parent = open_parent(max_payload=8)
    parent.receive_data(wire(Fetch(fetch_id=1, package="app-1.0")))
    parent.next_event()
    with pytest.raises(LocalProtocolError):
        parent.send(Chunk(fetch_id=1, offset=0, data=b"123456789"))  # over the cap
    with pytest.raises(LocalProtocolError):
        parent.send(Chunk(fetch_id=1, offset=5, data=b"1"))  # wrong offset
    assert parent.open_fetches == {1: 0}
    parent.send(Chunk(fetch_id=1, offset=0, data=b"12345678"))
    with pytest.raises(LocalProtocolError):
        parent.send(FetchEnd(fetch_id=1, size=9))  # wrong size
    assert parent.open_fetches == {1: 8}
    parent.send(FetchEnd(fetch_id=1, size=8))
    assert parent.open_fetches == {}


def test_version_mismatch() -> None:
    for proto in (PROTOCOL_VERSION + 1, 0, -1, 2**40):
        conn = Connection(P)
        conn.receive_data(MAGIC + wire(Hello(node="c", role="client", proto=proto)))
        with pytest.raises(RemoteProtocolError) as info:
            conn.next_event()
        assert info.value.code is ErrorCode.UNSUPPORTED_VERSION
        err = decode_error_frame(conn.send_error(info.value), Connection(C))
        assert err.code == ErrorCode.UNSUPPORTED_VERSION


# -- 7. fetch bookkeeping -----------------------------------------------------


def fetching_pair(*fetches: Fetch) -> tuple[Connection, Connection]:
    """An open child/parent pair with ``fetches`` sent and received."""
    child, parent = open_child(), open_parent()
    for f in fetches:
        parent.receive_data(sent(child.send(f)))
        assert parent.next_event() == f
    return child, parent


def refused_both_ways(child: Connection, parent: Connection, msg: Message) -> None:
    """``msg`` from the parent is a LocalProtocolError there and a
    RemoteProtocolError at the child (fed the same frame)."""
    with pytest.raises(LocalProtocolError):
        parent.send(msg)
    child.receive_data(wire(msg))
    with pytest.raises(RemoteProtocolError):
        child.next_event()


F1 = Fetch(fetch_id=1, package="app-1.0")


@pytest.mark.parametrize(
    "msg",
    [
        Chunk(fetch_id=2, offset=0, data=b"x"),  # never opened
        Chunk(fetch_id=1, offset=1, data=b"x"),  # wrong offset
        Chunk(fetch_id=1, offset=-1, data=b"x"),
        Chunk(fetch_id=1, offset=0, data=b""),  # empty
        FetchEnd(fetch_id=1, size=1),  # no data was sent
        FetchEnd(fetch_id=2, size=0),  # never opened
        FetchFail(fetch_id=2, reason="?"),  # never opened
    ],
    ids=["unopened", "offset", "negative", "empty", "size", "end-unopened", "fail-unopened"],
)
def test_fetch_errors(msg: Message) -> None:
    refused_both_ways(*fetching_pair(F1), msg)


def test_chunks_must_be_contiguous() -> None:
    child, parent = fetching_pair(F1)
    for m in (Chunk(fetch_id=1, offset=0, data=b"abc"), Chunk(fetch_id=1, offset=3, data=b"de")):
        child.receive_data(sent(parent.send(m)))
        assert child.next_event() == m
    assert child.open_fetches == parent.open_fetches == {1: 5}
    refused_both_ways(child, parent, Chunk(fetch_id=1, offset=3, data=b"de"))  # repeated


def test_a_chunk_streamed_in_pieces_is_the_same_frame() -> None:
    """``send_chunk_start`` and the payload written after it in pieces make
    the bytes ``send`` makes for the whole chunk, tracked the same way."""
    child, parent = fetching_pair(F1)
    _, whole = fetching_pair(F1)
    data = bytes(range(256)) * 40
    streamed = parent.send_chunk_start(1, 0, len(data)) + data[:1000] + data[1000:]
    assert streamed == sent(whole.send(Chunk(fetch_id=1, offset=0, data=data)))
    child.receive_data(streamed)
    assert child.next_event() == Chunk(fetch_id=1, offset=0, data=data)
    assert parent.open_fetches == child.open_fetches == {1: len(data)}
    with pytest.raises(LocalProtocolError, match="expected 10240"):
        parent.send_chunk_start(1, 0, 10)
    with pytest.raises(LocalProtocolError, match="out of range"):
        parent.send_chunk_start(1, len(data), 0)
    with pytest.raises(LocalProtocolError, match="not open"):
        parent.send_chunk_start(2, 0, 10)


def test_fetch_end_with_short_size() -> None:
    child, parent = fetching_pair(F1)
    child.receive_data(sent(parent.send(Chunk(fetch_id=1, offset=0, data=b"abc"))))
    child.next_event()
    refused_both_ways(child, parent, FetchEnd(fetch_id=1, size=2))


def test_chunk_after_fetch_end_refused() -> None:
    child, parent = fetching_pair(F1)
    for m in (Chunk(fetch_id=1, offset=0, data=b"abc"), FetchEnd(fetch_id=1, size=3)):
        child.receive_data(sent(parent.send(m)))
        child.next_event()
    refused_both_ways(child, parent, Chunk(fetch_id=1, offset=3, data=b"d"))


def test_duplicate_fetch_id() -> None:
    child, parent = fetching_pair(F1)
    with pytest.raises(LocalProtocolError):
        child.send(Fetch(fetch_id=1, package="other-2"))
    parent.receive_data(wire(Fetch(fetch_id=1, package="other-2")))
    with pytest.raises(RemoteProtocolError):
        parent.next_event()


def test_fetch_id_reusable_once_finished() -> None:
    child, parent = fetching_pair(F1)
    child.receive_data(sent(parent.send(FetchEnd(fetch_id=1, size=0))))
    child.next_event()
    parent.receive_data(sent(child.send(F1)))
    assert parent.next_event() == F1


def test_negative_fetch_offset() -> None:
    bad = Fetch(fetch_id=1, package="app-1.0", offset=-1024)
    with pytest.raises(LocalProtocolError):
        open_child().send(bad)
    with pytest.raises(RemoteProtocolError):
        feed_open(P, wire(bad))


def test_open_fetch_limit() -> None:
    fetches = [Fetch(fetch_id=i, package="app-1.0") for i in range(MAX_OPEN_FETCHES)]
    child, parent = fetching_pair(*fetches)
    assert len(parent.open_fetches) == MAX_OPEN_FETCHES
    one_more = Fetch(fetch_id=MAX_OPEN_FETCHES, package="app-1.0")
    with pytest.raises(LocalProtocolError):
        child.send(one_more)
    parent.receive_data(wire(one_more))
    with pytest.raises(RemoteProtocolError):
        parent.next_event()
    # finishing one makes room again
    child, parent = fetching_pair(*fetches)
    child.receive_data(sent(parent.send(FetchFail(fetch_id=0, reason="no"))))
    child.next_event()
    parent.receive_data(sent(child.send(one_more)))
    assert parent.next_event() == one_more


def test_resume_from_offset() -> None:
    start = 3 * 1024 * 1024
    child, parent = fetching_pair(Fetch(fetch_id=9, package="app-1.0", offset=start))
    assert child.open_fetches == parent.open_fetches == {9: start}
    msgs = [
        Chunk(fetch_id=9, offset=start, data=b"a" * 100),
        Chunk(fetch_id=9, offset=start + 100, data=b"b" * 50),
        FetchEnd(fetch_id=9, size=start + 150),
    ]
    for m in msgs:
        child.receive_data(sent(parent.send(m)))
        assert child.next_event() == m
    assert child.open_fetches == parent.open_fetches == {}


def test_resume_refuses_chunk_from_zero() -> None:
    child, parent = fetching_pair(Fetch(fetch_id=9, package="app-1.0", offset=4096))
    refused_both_ways(child, parent, Chunk(fetch_id=9, offset=0, data=b"x"))


def test_cancel_of_finished_fetch_is_harmless() -> None:
    child, parent = fetching_pair(F1)
    for m in (Chunk(fetch_id=1, offset=0, data=b"abc"), FetchEnd(fetch_id=1, size=3)):
        child.receive_data(sent(parent.send(m)))
        child.next_event()
    cancel = FetchCancel(fetch_id=1)
    parent.receive_data(sent(child.send(cancel)))  # crossed the FETCH_END on the wire
    assert parent.next_event() == cancel
    assert child.open_fetches == parent.open_fetches == {}
    assert child.state is parent.state is State.OPEN
    # a cancel for an id never opened is harmless too
    parent.receive_data(sent(child.send(FetchCancel(fetch_id=12345))))
    assert parent.next_event() == FetchCancel(fetch_id=12345)


def test_cancel_then_in_flight_chunks_then_fail() -> None:
    child, parent = fetching_pair(F1)
    cancel = FetchCancel(fetch_id=1)
    parent.receive_data(sent(child.send(cancel)))
    assert child.open_fetches == {1: 0}  # still open until the parent says so
    in_flight = Chunk(fetch_id=1, offset=0, data=b"abc")
    child.receive_data(sent(parent.send(in_flight)))
    assert child.next_event() == in_flight
    assert parent.next_event() == cancel
    fail = FetchFail(fetch_id=1, reason="cancelled")
    child.receive_data(sent(parent.send(fail)))
    assert child.next_event() == fail
    assert child.open_fetches == parent.open_fetches == {}


# -- 8. end of stream ---------------------------------------------------------


def test_eof_at_frame_boundary_in_open_is_not_graceful() -> None:
    conn = open_parent()
    conn.receive_data(wire(Ping(nonce=1)))
    conn.receive_data(b"")
    assert conn.next_event() == Ping(nonce=1)
    assert conn.next_event() == ConnectionClosed(graceful=False)
    assert conn.next_event() == ConnectionClosed(graceful=False)  # and stays so


def test_eof_before_anything() -> None:
    conn = Connection(P)
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed(graceful=False)
    child = Connection(C)
    child.send(HELLO)
    child.receive_data(b"")
    assert child.next_event() == ConnectionClosed(graceful=False)


def test_eof_after_goodbye_is_graceful() -> None:
    conn = open_parent()
    conn.receive_data(wire(Goodbye(reason="done")) + b"")
    conn.receive_data(b"")
    assert conn.next_event() == Goodbye(reason="done")
    assert conn.next_event() == ConnectionClosed(graceful=True)
    # also when this side said goodbye first
    conn = open_child()
    conn.send(Goodbye())
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed(graceful=True)


def test_eof_after_error_is_graceful() -> None:
    conn = open_child()
    conn.receive_data(wire(Error(code=5, reason="revoked")))
    conn.receive_data(b"")
    assert conn.next_event() == Error(code=5, reason="revoked")
    assert conn.next_event() == ConnectionClosed(graceful=True)


@pytest.mark.parametrize("cut", [1, 7, 8, 9, -1])
def test_eof_mid_frame(cut: int) -> None:
    frame = wire(Chunk(fetch_id=1, offset=0, data=b"abcdef"))
    child, _ = fetching_pair(F1)
    child.receive_data(frame[:cut])
    assert child.next_event() is NEED_DATA
    child.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        child.next_event()


def test_eof_mid_preamble() -> None:
    conn = Connection(P)
    conn.receive_data(MAGIC[:2])
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


# -- 9. the whole table, both ways --------------------------------------------

# Fetch state a message needs to be acceptable apart from the table.
FETCH_SETUP = {
    MessageType.CHUNK: {1: 0},
    MessageType.FETCH_END: {1: 3},
    MessageType.FETCH_FAIL: {1: 0},
}
ALL_KEYS = [(s, side, t) for s in State for side in Side for t in MessageType]
FORBIDDEN = [k for k in ALL_KEYS if k not in TRANSITIONS]
ALLOWED = list(TRANSITIONS)


def _key_id(key: tuple[State, Side, MessageType]) -> str:
    return f"{key[0].value}-{key[1].value}-{key[2].name}"


def at_state(side: Side, state: State, mtype: MessageType) -> Connection:
    conn = Connection(side)
    conn.state = state
    conn.open_fetches.update(FETCH_SETUP.get(mtype, {}))
    return conn


def test_table_shape() -> None:
    assert len(FORBIDDEN) + len(ALLOWED) == len(ALL_KEYS)
    assert all(s is not State.CLOSED for s, _, _ in TRANSITIONS)  # CLOSED is final
    senders = {t: {side for _, side, t2 in TRANSITIONS if t2 is t} for t in MessageType}
    assert senders[MessageType.HELLO] == {C}
    assert senders[MessageType.WELCOME] == {P}
    assert senders[MessageType.FETCH] == {C}
    assert senders[MessageType.CHUNK] == {P}
    assert senders[MessageType.PING] == senders[MessageType.ERROR] == {C, P}


@pytest.mark.parametrize("key", FORBIDDEN, ids=_key_id)
def test_forbidden_transition(key: tuple[State, Side, MessageType]) -> None:
    state, sender, mtype = key
    msg = SAMPLES[mtype]
    conn = at_state(sender, state, mtype)
    with pytest.raises(LocalProtocolError):
        conn.send(msg)
    assert conn.state is state
    receiver = at_state(P if sender is C else C, state, mtype)
    receiver.receive_data(MAGIC + wire(msg))
    with pytest.raises(RemoteProtocolError):
        receiver.next_event()
    assert receiver.state is state


@pytest.mark.parametrize("key", ALLOWED, ids=_key_id)
def test_allowed_transition(key: tuple[State, Side, MessageType]) -> None:
    state, sender, mtype = key
    msg = SAMPLES[mtype]
    conn = at_state(sender, state, mtype)
    conn.send(msg)
    assert conn.state is TRANSITIONS[key]
    receiver = at_state(P if sender is C else C, state, mtype)
    receiver.receive_data(MAGIC + wire(msg))
    assert receiver.next_event() == msg
    assert receiver.state is TRANSITIONS[key]
