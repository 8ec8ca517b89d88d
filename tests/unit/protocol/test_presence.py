"""PRESENCE (protocol version 2) on bytes alone: who may send it, in which
state, its caps, and what a version 1 peer gets."""

from __future__ import annotations

import msgpack
import pytest

from protocol import (
    MAGIC,
    MAX_PRESENCE_BATCH,
    MAX_SOFTWARE,
    PROTOCOL_VERSION,
    Connection,
    ErrorCode,
    Hello,
    LocalProtocolError,
    Message,
    MessageType,
    Presence,
    RemoteProtocolError,
    Side,
    Welcome,
    encode,
)

C, P = Side.CHILD, Side.PARENT
HELLO = Hello(node="relay-a", role="relay", software="rdsd/0.1.0")
WELCOME = Welcome(node="server", role="server")


def wire(msg: Message) -> bytes:
    return b"".join(bytes(b) for b in encode(msg))


def opened() -> tuple[Connection, Connection]:
    child, parent = Connection(C), Connection(P)
    parent.receive_data(b"".join(bytes(b) for b in child.send(HELLO)))
    assert parent.next_event() == HELLO
    child.receive_data(b"".join(bytes(b) for b in parent.send(WELCOME)))
    assert child.next_event() == WELCOME
    return child, parent


def test_version_is_three_and_presence_has_tag_22() -> None:
    assert PROTOCOL_VERSION == 3
    assert int(MessageType.PRESENCE) == 22


def test_child_sends_presence_and_parent_decodes_it() -> None:
    child, parent = opened()
    msg = Presence(
        online={"c1": b"relay-a", "c2": b"relay-b"},
        offline=["c3"],
        software={"c1": "rdsd/0.1.0"},
        reset=True,
    )
    parent.receive_data(b"".join(bytes(b) for b in child.send(msg)))
    assert parent.next_event() == msg


def test_defaults_are_an_empty_change() -> None:
    msg = Presence()
    assert (msg.online, msg.offline, msg.software, msg.reset) == ({}, [], {}, False)


def test_parent_may_not_send_presence() -> None:
    _, parent = opened()
    with pytest.raises(LocalProtocolError):
        parent.send(Presence(offline=["c1"]))
    child, _ = opened()
    child.receive_data(wire(Presence(offline=["c1"])))
    with pytest.raises(RemoteProtocolError):
        child.next_event()


def test_presence_before_welcome_is_refused() -> None:
    parent = Connection(P)
    parent.receive_data(MAGIC + wire(HELLO) + wire(Presence(offline=["c1"])))
    assert parent.next_event() == HELLO
    with pytest.raises(RemoteProtocolError):
        parent.next_event()


def _names(n: int) -> list[str]:
    return [f"c{i}" for i in range(n)]


@pytest.mark.parametrize(
    "msg",
    [
        Presence(offline=_names(MAX_PRESENCE_BATCH + 1)),
        Presence(
            online=dict.fromkeys(_names(MAX_PRESENCE_BATCH // 2 + 1), b"relay-a"),
            offline=[f"x{i}" for i in range(MAX_PRESENCE_BATCH // 2)],
        ),
        Presence(online={"c1": b"relay-a"}, software={"c2": "rdsd/1"}),
        Presence(online={"c1": b"relay-a"}, software={"c1": "x" * (MAX_SOFTWARE + 1)}),
        Presence(online={"c1": b"relay-a"}, offline=["c1"]),
    ],
    ids=["too-many", "too-many-mixed", "software-not-online", "software-long", "both"],
)
def test_caps_and_consistency_on_both_sides(msg: Presence) -> None:
    child, parent = opened()
    with pytest.raises(LocalProtocolError):
        child.send(msg)
    _, parent = opened()
    parent.receive_data(wire(msg))
    with pytest.raises(RemoteProtocolError) as info:
        parent.next_event()
    assert info.value.code is ErrorCode.PROTOCOL


def test_a_full_batch_passes() -> None:
    child, parent = opened()
    msg = Presence(offline=_names(MAX_PRESENCE_BATCH))
    parent.receive_data(b"".join(bytes(b) for b in child.send(msg)))
    assert parent.next_event() == msg


def test_unsafe_names_are_refused() -> None:
    for bad in ("..", "a/b", "x\x00"):
        header = msgpack.packb([int(MessageType.PRESENCE), {"offline": [bad]}])
        frame = len(header).to_bytes(4, "big") + (0).to_bytes(4, "big") + header
        _, parent = opened()
        parent.receive_data(frame)
        with pytest.raises(RemoteProtocolError):
            parent.next_event()


def test_version_one_hello_is_refused() -> None:
    parent = Connection(P)
    parent.receive_data(MAGIC + wire(Hello(node="c", role="client", proto=1)))
    with pytest.raises(RemoteProtocolError) as info:
        parent.next_event()
    assert info.value.code is ErrorCode.UNSUPPORTED_VERSION
