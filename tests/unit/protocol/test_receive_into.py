"""Receiving into the decoder's own buffers (``get_buffer``/``buffer_updated``,
what a ``BufferedProtocol`` or ``recv_into`` reader uses): a chunk's bytes
land in the buffer the message then carries, and the messages are the same
as when the bytes are fed."""

from __future__ import annotations

import os
import random

import pytest

from protocol import (
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    Chunk,
    Connection,
    Fetch,
    FetchEnd,
    Hello,
    Message,
    Ping,
    RemoteProtocolError,
    Side,
    Welcome,
)
from protocol.connection import NEED_DATA

CHUNK = 256 * 1024


def hello() -> Hello:
    return Hello(node="c1", role="client", proto=PROTOCOL_VERSION, software="t")


def parent_stream(datas: list[bytes]) -> tuple[bytes, bytes]:
    """What a parent sends: its WELCOME, then (for fetch 1) chunks, each
    followed by a PING, then the end."""
    parent = Connection(Side.PARENT)
    parent.receive_data(b"".join(Connection(Side.CHILD).send(hello())))
    assert isinstance(parent.next_event(), Hello)
    welcome = b"".join(parent.send(Welcome(node="p", role="server")))
    parent.open_fetches[1] = 0  # as if the child's FETCH had arrived
    out = bytearray()
    offset = 0
    for data in datas:
        out += b"".join(parent.send(Chunk(fetch_id=1, offset=offset, data=data)))
        offset += len(data)
        out += b"".join(parent.send(Ping(nonce=offset)))
    out += b"".join(parent.send(FetchEnd(fetch_id=1, size=offset)))
    return welcome, bytes(out)


def child_after_fetch(welcome: bytes) -> Connection:
    """A child that got its WELCOME (fed) and asked for fetch 1."""
    child = Connection(Side.CHILD)
    child.send(hello())
    child.receive_data(welcome)
    assert isinstance(child.next_event(), Welcome)
    child.send(Fetch(fetch_id=1, package="a-1", offset=0))
    return child


def drain(conn: Connection, out: list[Message]) -> None:
    while (event := conn.next_event()) is not NEED_DATA:
        assert isinstance(event, Message)
        out.append(event)


def receive_into(
    conn: Connection, wire: bytes, sizes: list[int], rng: random.Random
) -> list[Message]:
    """Deliver ``wire`` the way a BufferedProtocol does: into get_buffer, in
    pieces of random size, taking messages as they complete."""
    out: list[Message] = []
    pos = 0
    while pos < len(wire):
        buf = conn.get_buffer(-1)
        n = min(len(buf), len(wire) - pos, rng.choice(sizes))
        buf[:n] = wire[pos : pos + n]
        conn.buffer_updated(n)
        pos += n
        drain(conn, out)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_messages_are_the_same_received_into_buffers_as_fed(seed: int) -> None:
    rng = random.Random(seed)
    datas = [os.urandom(CHUNK) for _ in range(3)] + [os.urandom(1234)]
    welcome, wire = parent_stream(datas)
    got = receive_into(child_after_fetch(welcome), wire, [1, 7, 100, 16 * 1024, 1 << 20], rng)
    fed = child_after_fetch(welcome)
    fed.receive_data(wire)
    want: list[Message] = []
    drain(fed, want)
    assert [bytes(m.data) for m in got if isinstance(m, Chunk)] == datas
    assert [type(m) for m in got] == [type(m) for m in want]
    assert isinstance(got[-1], FetchEnd)
    assert sum(isinstance(m, Ping) for m in got) == len(datas)


def test_a_chunk_payload_is_received_where_the_message_carries_it() -> None:
    """Once a chunk's header is in, get_buffer is the rest of its payload
    buffer: the bytes are written there once and the message's data views it."""
    data = os.urandom(CHUNK)
    welcome, wire = parent_stream([data])
    conn = child_after_fetch(welcome)
    out: list[Message] = []
    pos = 0
    handed: list[memoryview] = []
    while pos < len(wire):
        buf = conn.get_buffer(-1)
        handed.append(buf)
        n = min(len(buf), len(wire) - pos, 16 * 1024)
        buf[:n] = wire[pos : pos + n]
        conn.buffer_updated(n)
        pos += n
        drain(conn, out)
    chunk = next(m for m in out if isinstance(m, Chunk))
    assert isinstance(chunk.data, memoryview)
    assert bytes(chunk.data) == data
    direct = [b for b in handed if b.obj is chunk.data.obj]
    # All but the first 64 KiB read (prefix, header, payload start) went
    # straight into the payload's own buffer.
    assert sum(min(len(b), 16 * 1024) for b in direct) >= CHUNK - 64 * 1024


def test_a_payload_buffer_may_be_filled_whole_before_one_update() -> None:
    """``filling_payload`` says get_buffer handed out the rest of a payload:
    a reader may fill all of it in several reads and report once."""
    data = os.urandom(CHUNK)
    welcome, wire = parent_stream([data])
    conn = child_after_fetch(welcome)
    out: list[Message] = []
    pos = 0
    updates = 0
    while pos < len(wire):
        buf = conn.get_buffer(-1)
        size = len(buf) if conn.filling_payload else min(len(buf), 16 * 1024)
        n = min(size, len(wire) - pos)
        for at in range(0, n, 16 * 1024):  # in TLS-record-sized reads
            buf[at : min(n, at + 16 * 1024)] = wire[pos + at : pos + min(n, at + 16 * 1024)]
        conn.buffer_updated(n)
        updates += 1
        pos += n
        drain(conn, out)
    chunk = next(m for m in out if isinstance(m, Chunk))
    assert bytes(chunk.data) == data
    # The prefix and header in a read or two, then the payload in one.
    assert updates <= 3, updates


def test_unread_counts_what_waits_for_the_reader() -> None:
    """What a reader pauses on: bytes beyond the payload being received, and
    a complete payload nobody took yet."""
    data = os.urandom(CHUNK)
    welcome, wire = parent_stream([data, data])
    conn = child_after_fetch(welcome)
    pos = 0
    while pos < len(wire):
        buf = conn.get_buffer(-1)
        n = min(len(buf), len(wire) - pos)
        buf[:n] = wire[pos : pos + n]
        conn.buffer_updated(n)
        pos += n
    # Nothing was taken: every byte waits (but the first frame's prefix and
    # header, read as they came so its payload could be received in place).
    assert len(wire) - 64 <= conn.unread <= len(wire)
    out: list[Message] = []
    drain(conn, out)
    assert conn.unread == 0
    assert len(out) == 5


def test_an_oversized_prefix_is_refused_before_any_payload_buffer() -> None:
    welcome, _ = parent_stream([b"x"])
    conn = child_after_fetch(welcome)
    bad = (8).to_bytes(4, "big") + (MAX_PAYLOAD + 1).to_bytes(4, "big")
    buf = conn.get_buffer(-1)
    buf[: len(bad)] = bad
    conn.buffer_updated(len(bad))
    with pytest.raises(RemoteProtocolError):
        drain(conn, [])
    assert len(conn.get_buffer(-1)) < MAX_PAYLOAD
