"""Property tests: whatever bytes arrive, the protocol answers only with
messages, NEED_DATA / ConnectionClosed, or RemoteProtocolError, and every
well-formed message survives the trip through the wire format unchanged."""

from __future__ import annotations

import itertools
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (
    MAGIC,
    NEED_DATA,
    Chunk,
    Connection,
    ConnectionClosed,
    Error,
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
    Message,
    MessageType,
    PendingDone,
    PendingQuery,
    Ping,
    Pong,
    Presence,
    RemoteProtocolError,
    Report,
    ReportAck,
    Revoked,
    Side,
    State,
    Topology,
    Welcome,
    encode,
    is_package_id,
    is_safe_name,
)
from protocol.messages import from_wire, to_wire

PREFIX = struct.Struct(">II")
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def wire(msg: Message) -> bytes:
    return b"".join(bytes(b) for b in encode(msg))


def sent(buffers: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(b) for b in buffers)


HELLO = Hello(node="relay-a", role="relay")
WELCOME = Welcome(node="server", role="server", time=1.0)

# What a child says over a whole session, and what a parent says back: every
# frame of each stream is acceptable to the other side's driver below.
CHILD_FRAMES = [MAGIC] + [
    wire(m)
    for m in [
        HELLO,
        PendingQuery(),
        Fetch(fetch_id=1, package="app-1.0"),
        Fetch(fetch_id=2, package="app-1.0", offset=4),
        Report(report_id="r1", job="job1", node="relay-a", state="stored", seq=1),
        Topology(nodes={"c1": b"client", "c2": b"client"}),
        Holdings(packages={"app-1.0": 1.9e9}),
        JobAnnounce(
            job="r.1",
            type="install",
            package="app-1.0",
            destinations=["c1"],
            origin="relay-a",
            manifest=b"signed manifest",
        ),
        FetchCancel(fetch_id=2),
        Ping(nonce=1),
        Pong(nonce=5),
        Goodbye(reason="bye"),
    ]
]
CHILD_STREAM = b"".join(CHILD_FRAMES)
CHILD_FETCHES = [
    Fetch(fetch_id=1, package="app-1.0"),
    Fetch(fetch_id=2, package="app-1.0", offset=4),
]
PARENT_FRAMES = [MAGIC] + [
    wire(m)
    for m in [
        WELCOME,
        JobNotice(
            job="job1",
            type="install",
            package="app-1.0",
            destinations=["c1"],
            manifest=b"signed manifest",
        ),
        PendingDone(jobs=["job1"]),
        Chunk(fetch_id=1, offset=0, data=b"0123"),
        Chunk(fetch_id=2, offset=4, data=b"4567"),
        Chunk(fetch_id=1, offset=4, data=b"4567"),
        FetchEnd(fetch_id=1, size=8),
        FetchFail(fetch_id=2, reason="cancelled"),
        ReportAck(report_id="r1"),
        JobCancel(job="job1", destinations=["c1"]),
        Revoked(nodes=["c9"]),
        Ping(nonce=5),
        Pong(nonce=1),
        Error(code=7, reason="shutting down"),
    ]
]
PARENT_STREAM = b"".join(PARENT_FRAMES)


def drain(conn: Connection, data: bytes, *, eof: bool = True) -> list[Message]:
    """Feed ``data`` (then EOF) and pull events until the connection stops.

    A parent answers HELLO with WELCOME and a child sends its FETCHes once
    open, so frames after the handshake are judged in the OPEN state. Any
    exception other than RemoteProtocolError escapes and fails the test.
    """
    if data:  # b"" would mean EOF
        conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    got: list[Message] = []
    while True:
        try:
            event = conn.next_event()
        except RemoteProtocolError as exc:
            with pytest.raises(RemoteProtocolError):
                conn.next_event()  # sticky
            check_error_frame(conn, exc)
            return got
        if event is NEED_DATA:
            assert not eof
            return got
        if isinstance(event, ConnectionClosed):
            assert eof
            assert event.graceful is (conn.state is State.CLOSED)
            return got
        assert isinstance(event, Message), event
        got.append(event)
        if conn.side is Side.PARENT and isinstance(event, Hello):
            conn.send(WELCOME)
        if conn.side is Side.CHILD and isinstance(event, Welcome):
            for f in CHILD_FETCHES:
                conn.send(f)


def check_error_frame(conn: Connection, exc: RemoteProtocolError) -> None:
    """The ERROR we would send is a frame the peer decodes."""
    out = sent(conn.send_error(exc))
    if not out:  # already closed and the preamble already went out
        return
    # A fresh peer in START accepts an ERROR from either side; it needs the
    # preamble, which ``out`` carries only if nothing was sent before.
    peer = Connection(Side.CHILD if conn.side is Side.PARENT else Side.PARENT)
    peer.receive_data(out if out.startswith(MAGIC) else MAGIC + out)
    event = peer.next_event()
    assert isinstance(event, Error)
    assert event.code == int(exc.code)


def new_parent() -> Connection:
    return Connection(Side.PARENT)


def new_child() -> Connection:
    conn = Connection(Side.CHILD)
    conn.send(HELLO)
    return conn


def test_clean_streams_decode_completely() -> None:
    parent = new_parent()
    got = drain(parent, CHILD_STREAM)
    assert len(got) == 12
    assert parent.state is State.CLOSED
    child = new_child()
    got = drain(child, PARENT_STREAM)
    assert len(got) == 14
    assert child.state is State.CLOSED
    assert child.open_fetches == {}


# -- strategies for well-formed messages ---------------------------------------

names = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True).filter(is_safe_name)
parts = st.from_regex(r"[A-Za-z0-9._]{1,30}", fullmatch=True).filter(lambda s: s.strip(".") != "")
packages = st.builds(lambda a, b: f"{a}-{b}", parts, parts).filter(is_package_id)
ints = st.integers(-(2**63), 2**64 - 1)
floats = st.floats(allow_nan=False)
texts = st.text(max_size=40)
payloads = st.binary(max_size=300)

STRATEGIES: dict[MessageType, st.SearchStrategy[Message]] = {
    MessageType.HELLO: st.builds(
        Hello, node=names, role=texts, purpose=texts, proto=ints, software=texts
    ),
    MessageType.WELCOME: st.builds(Welcome, node=names, role=texts, proto=ints, time=floats),
    MessageType.JOB_NOTICE: st.builds(
        JobNotice,
        job=names,
        type=texts,
        package=packages,
        destinations=st.lists(names, max_size=5),
        at=st.none() | floats,
        origin=st.none() | names,
        generation=ints,
        manifest=payloads,
    ),
    MessageType.PENDING_QUERY: st.just(PendingQuery()),
    MessageType.PENDING_DONE: st.builds(PendingDone, jobs=st.lists(names, max_size=5)),
    MessageType.FETCH: st.builds(Fetch, fetch_id=ints, package=packages, offset=ints),
    MessageType.CHUNK: st.builds(
        Chunk, fetch_id=ints, offset=ints, data=payloads | payloads.map(lambda b: memoryview(b))
    ),
    MessageType.FETCH_END: st.builds(FetchEnd, fetch_id=ints, size=ints),
    MessageType.FETCH_FAIL: st.builds(FetchFail, fetch_id=ints, reason=texts),
    MessageType.FETCH_CANCEL: st.builds(FetchCancel, fetch_id=ints),
    MessageType.REPORT: st.builds(
        Report,
        report_id=texts,
        job=names,
        node=names,
        state=texts,
        seq=ints,
        detail=texts,
        package=st.none() | packages,
        time=floats,
        origin=st.none() | names,
    ),
    MessageType.REPORT_ACK: st.builds(ReportAck, report_id=texts),
    MessageType.TOPOLOGY: st.builds(
        Topology, nodes=st.dictionaries(names, st.binary(max_size=40), max_size=5)
    ),
    MessageType.HOLDINGS: st.builds(
        Holdings, packages=st.dictionaries(packages, floats, max_size=5)
    ),
    MessageType.JOB_ANNOUNCE: st.builds(
        JobAnnounce,
        job=names,
        type=texts,
        package=packages,
        destinations=st.lists(names, max_size=5),
        origin=names,
        at=st.none() | floats,
        manifest=payloads,
    ),
    MessageType.REVOKED: st.builds(Revoked, nodes=st.lists(names, max_size=5)),
    MessageType.JOB_CANCEL: st.builds(
        JobCancel, job=names, destinations=st.lists(names, max_size=5)
    ),
    MessageType.PING: st.builds(Ping, nonce=ints),
    MessageType.PONG: st.builds(Pong, nonce=ints),
    MessageType.PRESENCE: st.builds(
        Presence,
        online=st.dictionaries(names, st.binary(max_size=40), max_size=5),
        reset=st.booleans(),
    ),
    MessageType.ERROR: st.builds(Error, code=ints, reason=texts),
    MessageType.GOODBYE: st.builds(Goodbye, reason=texts),
}
any_message = st.one_of(*STRATEGIES.values())


# -- (a) arbitrary bytes ------------------------------------------------------

# msgpack-able values of every kind the decoder can produce.
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=10) | st.binary(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)
# Values that are right, nearly right or plainly wrong for the usual fields.
typical_values = st.sampled_from(
    [
        0,
        1,
        2**40,
        -1,
        1.5,
        "client1",
        "app-1.0",
        "app",
        "..",
        "",
        ["client1"],
        [None],
        ["a/b"],
        {"client1": "client"},
        {"app-1.0": 1.0},
        {"app-1.0": "x"},
        {"..": 1},
        None,
        True,
        b"x",
    ]
)


@st.composite
def corrupted_headers(draw: st.DrawFn) -> tuple[Any, bytes]:
    """The header object and payload of a valid message with one thing
    spoiled: a field's value, a missing or extra field, the tag, the shape,
    or the payload. Every other field stays valid, so the decoder's check of
    the spoiled one is always reached."""
    msg = draw(any_message)
    tag, fields = to_wire(msg)
    payload = bytes(msg.payload)
    names = list(fields)
    op = draw(
        st.sampled_from(["value", "value", "value", "drop", "add", "tag", "shape", "payload"])
    )
    if op == "value" and names:
        fields[draw(st.sampled_from(names))] = draw(typical_values | msgpack_values)
    elif op == "drop" and names:
        del fields[draw(st.sampled_from(names))]
    elif op == "add":
        fields[draw(st.sampled_from(["data", "manifest", "TYPE", "payload", "x"]))] = 1
    elif op == "tag":
        tag = draw(st.integers(-1, 21) | msgpack_values)
    elif op == "shape":
        return draw(st.sampled_from([[tag], fields, [tag, fields, None], tag, [fields, tag]])), b""
    elif op == "payload":
        payload = draw(st.binary(max_size=8))
    return [tag, fields], payload


@st.composite
def corrupted_frames(draw: st.DrawFn) -> bytes:
    header, payload = draw(corrupted_headers())
    packed = msgpack.packb(header, use_bin_type=True)
    return PREFIX.pack(len(packed), len(payload)) + packed + payload


@st.composite
def framed(draw: st.DrawFn) -> bytes:
    """A frame with a correct length prefix around junk."""
    header = draw(st.binary(max_size=40))
    payload = draw(st.binary(max_size=20))
    return PREFIX.pack(len(header), len(payload)) + header + payload


arbitrary = st.binary(max_size=600)
frames = st.lists(corrupted_frames() | framed(), min_size=1, max_size=4).map(b"".join)


@FUZZ
@given(arbitrary, st.booleans())
def test_arbitrary_bytes(data: bytes, eof: bool) -> None:
    drain(new_parent(), data, eof=eof)


@FUZZ
@given(arbitrary | frames, st.booleans())
def test_arbitrary_bytes_after_magic(data: bytes, eof: bool) -> None:
    drain(new_parent(), MAGIC + data, eof=eof)


@FUZZ
@given(arbitrary | frames, st.booleans())
def test_arbitrary_bytes_after_hello(data: bytes, eof: bool) -> None:
    got = drain(new_parent(), MAGIC + wire(HELLO) + data, eof=eof)
    assert got[0] == HELLO


@FUZZ
@given(arbitrary | frames, st.booleans())
def test_arbitrary_bytes_to_child(data: bytes, eof: bool) -> None:
    drain(new_child(), MAGIC + wire(WELCOME) + data, eof=eof)


@FUZZ
@given(corrupted_headers())
def test_corrupted_headers_give_a_message_or_remote_error(obj: tuple[Any, bytes]) -> None:
    header, payload = obj
    try:
        msg = from_wire(header, payload)
    except RemoteProtocolError:
        return
    assert isinstance(msg, Message)
    assert from_wire(to_wire(msg), bytes(msg.payload)) == msg


# -- (b) mutations of a valid stream ------------------------------------------


# Bytes that mean something in msgpack (nil, bools, float64, uint64, empty
# str/array/map, str8, bin8, ext) or in a length prefix.
INTERESTING = [
    0x00,
    0x01,
    0x7F,
    0x80,
    0x90,
    0xA0,
    0xC0,
    0xC1,
    0xC2,
    0xC3,
    0xC4,
    0xC7,
    0xCB,
    0xCF,
    0xD9,
    0xDC,
    0xDE,
    0xFF,
]


@st.composite
def mutated(draw: st.DrawFn, pieces: list[bytes]) -> bytes:
    """A valid stream (given frame by frame) with a few bytes flipped, set,
    inserted or deleted. Each edit first picks a frame, so late frames get as
    much attention as early ones, and are judged in the state they belong to."""
    parts = [bytearray(p) for p in pieces]
    # Hypothesis leans towards small integers; positions should be uniform.
    rnd = draw(st.randoms(use_true_random=False))
    for _ in range(rnd.choice([1, 1, 1, 2, 3])):  # the first edit decides, mostly
        data = parts[rnd.randrange(len(parts))]
        op = draw(st.sampled_from(["flip", "set", "set", "insert", "delete", "truncate"]))
        pos = rnd.randrange(max(len(data), 1))
        if op == "flip" and data:
            data[pos] ^= 1 << rnd.randrange(8)
        elif op == "set" and data:
            data[pos] = rnd.choice(INTERESTING) if rnd.random() < 0.5 else rnd.randrange(256)
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[pos : pos + rnd.randint(1, 8)]
        elif op == "truncate":
            del data[pos:]
    return b"".join(parts)


@FUZZ
@given(mutated(CHILD_FRAMES), st.booleans())
def test_mutated_child_stream(data: bytes, eof: bool) -> None:
    drain(new_parent(), data, eof=eof)


@FUZZ
@given(mutated(PARENT_FRAMES), st.booleans())
def test_mutated_parent_stream(data: bytes, eof: bool) -> None:
    drain(new_child(), data, eof=eof)


@FUZZ
@given(mutated(CHILD_FRAMES), st.lists(st.integers(0, 700), max_size=10))
def test_mutated_stream_in_pieces(data: bytes, cuts: list[int]) -> None:
    """Splitting the input changes nothing about the outcome."""
    whole = new_parent()
    expected = drain(whole, data)
    conn = new_parent()
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    got: list[Message] = []
    for a, b in itertools.pairwise(bounds):  # an error stays raised for later pieces
        got += drain(conn, data[a:b], eof=False)
    got += drain(conn, b"")
    assert got == expected


# -- (c) valid messages round-trip -------------------------------------------


def test_strategies_cover_every_type() -> None:
    assert set(STRATEGIES) == set(MessageType)


@FUZZ
@given(st.lists(any_message, min_size=1, max_size=5), st.data())
def test_valid_messages_round_trip(msgs: list[Message], data: st.DataObject) -> None:
    stream = b"".join(wire(m) for m in msgs)
    dec = FrameDecoder()
    got: list[Message] = []
    # fed in random pieces
    pos = 0
    while pos < len(stream):
        step = data.draw(st.integers(1, max(1, len(stream) - pos)))
        dec.feed(stream[pos : pos + step])
        pos += step
        while (m := dec.next_message()) is not None:
            got.append(m)
    assert got == msgs
    assert dec.buffered == 0
    for before, after in zip(msgs, got, strict=True):
        assert type(after) is type(before)
        assert bytes(after.payload) == bytes(before.payload)
        assert from_wire(to_wire(before), bytes(before.payload)) == before


@FUZZ
@given(
    st.lists(
        st.sampled_from(
            [
                MessageType.PING,
                MessageType.PONG,
                MessageType.REPORT,
                MessageType.TOPOLOGY,
                MessageType.HOLDINGS,
                MessageType.PENDING_QUERY,
            ]
        ),
        max_size=6,
    ).flatmap(lambda tags: st.tuples(*(STRATEGIES[t] for t in tags)))
)
def test_valid_child_messages_through_connections(msgs: tuple[Message, ...]) -> None:
    """Generated messages also pass the connection checks end to end."""
    child, parent = Connection(Side.CHILD), Connection(Side.PARENT)
    parent.receive_data(sent(child.send(HELLO)))
    assert parent.next_event() == HELLO
    child.receive_data(sent(parent.send(WELCOME)))
    assert child.next_event() == WELCOME
    for m in msgs:
        parent.receive_data(sent(child.send(m)))
        assert parent.next_event() == m
    assert parent.next_event() is NEED_DATA
