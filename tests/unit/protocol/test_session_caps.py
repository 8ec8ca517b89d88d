"""The frame caps before a session is established, on bytes alone.

Until HELLO and WELCOME are through, a frame may carry at most
``PRE_SESSION_FRAME`` bytes of header and payload; the cap is checked from
the prefix, before the body is buffered, and lifted by the state change the
table makes on WELCOME. No sockets, no asyncio.
"""

from __future__ import annotations

import pytest

from protocol import (
    FRAME_CAPS,
    MAGIC,
    MAX_HEADER,
    MAX_PAYLOAD,
    NEED_DATA,
    PRE_SESSION_FRAME,
    Connection,
    ErrorCode,
    Hello,
    JobNotice,
    RemoteProtocolError,
    Side,
    State,
    Welcome,
    encode,
)
from protocol.frames import PREFIX

HELLO = Hello(node="relay-a", role="relay", software="rdsd test")
WELCOME = Welcome(node="server", role="server", time=1_700_000_000.25)


def wire(*buffers: bytes | memoryview) -> bytes:
    return b"".join(bytes(b) for b in buffers)


def test_every_state_has_a_cap() -> None:
    assert set(FRAME_CAPS) == set(State)
    assert FRAME_CAPS[State.START] == FRAME_CAPS[State.HELLO_SENT] == PRE_SESSION_FRAME
    assert FRAME_CAPS[State.OPEN] is None


@pytest.mark.parametrize(
    ("hlen", "plen"),
    [(MAX_HEADER, MAX_PAYLOAD - 1), (PRE_SESSION_FRAME, 1), (1, PRE_SESSION_FRAME)],
)
def test_big_frame_before_hello_refused_from_its_prefix(hlen: int, plen: int) -> None:
    conn = Connection(Side.PARENT)
    conn.receive_data(MAGIC + PREFIX.pack(hlen, plen))
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    assert "before the session is established" in str(info.value)


def test_refused_frame_is_not_buffered() -> None:
    """The body that follows a refused prefix is dropped, not kept: a peer
    trickling a 17 MiB frame costs this side nothing once refused."""
    conn = Connection(Side.PARENT)
    conn.receive_data(MAGIC + PREFIX.pack(MAX_HEADER, MAX_PAYLOAD - 1) + b"x" * 100_000)
    for _ in range(10):
        conn.receive_data(b"x" * 100_000)
    assert conn._decoder.buffered == 0
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_cap_checked_when_the_prefix_arrives_not_when_read() -> None:
    """``receive_data`` checks the prefix itself, so bytes fed without
    ``next_event`` in between are not piled up behind an oversized frame."""
    conn = Connection(Side.PARENT)
    conn.receive_data(MAGIC)
    conn.receive_data(PREFIX.pack(PRE_SESSION_FRAME, 1)[:5])
    conn.receive_data(PREFIX.pack(PRE_SESSION_FRAME, 1)[5:])
    conn.receive_data(b"y" * 50_000)
    assert conn._decoder.buffered == 0


def test_frame_at_the_cap_is_allowed_before_hello() -> None:
    conn = Connection(Side.PARENT)
    conn.receive_data(MAGIC + PREFIX.pack(PRE_SESSION_FRAME - 10, 10))
    assert conn.next_event() is NEED_DATA


def test_child_refuses_a_big_frame_instead_of_welcome() -> None:
    conn = Connection(Side.CHILD)
    conn.send(HELLO)
    assert conn.state is State.HELLO_SENT
    conn.receive_data(MAGIC + PREFIX.pack(10, PRE_SESSION_FRAME))
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE


def test_cap_lifts_with_welcome_even_in_the_same_read() -> None:
    """A parent may send WELCOME and a large JOB_NOTICE back to back: the
    notice is measured after WELCOME has opened the session."""
    notice = JobNotice(
        job="j1",
        type="install",
        package="p-1",
        destinations=["c1"],
        origin="server",
        generation=1,
        manifest=b"m" * (PRE_SESSION_FRAME * 2),
    )
    conn = Connection(Side.CHILD)
    conn.send(HELLO)
    conn.receive_data(MAGIC + wire(*encode(WELCOME)) + wire(*encode(notice)))
    assert conn.next_event() == WELCOME
    assert conn.state is State.OPEN
    assert conn.next_event() == notice


def test_parent_lifts_the_cap_when_it_welcomes() -> None:
    conn = Connection(Side.PARENT)
    conn.receive_data(MAGIC + wire(*encode(HELLO)))
    assert conn.next_event() == HELLO
    conn.receive_data(PREFIX.pack(PRE_SESSION_FRAME + 1, 0))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    conn = Connection(Side.PARENT)
    conn.receive_data(MAGIC + wire(*encode(HELLO)))
    assert conn.next_event() == HELLO
    conn.send(WELCOME)
    conn.receive_data(PREFIX.pack(PRE_SESSION_FRAME + 1, 0))
    assert conn.next_event() is NEED_DATA


def test_a_refused_connection_is_not_kept_alive_by_its_error() -> None:
    """The sticky error holds no traceback, so a refused connection (and
    the session and TLS state above it) is freed by reference counting at
    once, not at the next full garbage collection."""
    import gc
    import weakref

    gc.disable()
    try:
        conn = Connection(Side.PARENT)
        conn.receive_data(MAGIC + PREFIX.pack(MAX_HEADER, 1))
        for _ in range(2):
            with pytest.raises(RemoteProtocolError):
                conn.next_event()
        gone = weakref.ref(conn)
        del conn
        assert gone() is None
    finally:
        gc.enable()
