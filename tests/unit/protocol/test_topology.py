"""TOPOLOGY in batches and deltas, on bytes alone: a whole subtree as one
reset plus additions, then only changes; the per-message cap is checked on
both sides before anything is applied."""

from __future__ import annotations

import pytest

from protocol import (
    MAX_CLAIM,
    MAX_TOPOLOGY_BATCH,
    Connection,
    Hello,
    LocalProtocolError,
    Message,
    RemoteProtocolError,
    Side,
    Topology,
    Welcome,
    encode,
)

C, P = Side.CHILD, Side.PARENT


def opened() -> tuple[Connection, Connection]:
    child, parent = Connection(C), Connection(P)
    parent.receive_data(b"".join(bytes(b) for b in child.send(Hello(node="r1", role="relay"))))
    parent.next_event()
    child.receive_data(b"".join(bytes(b) for b in parent.send(Welcome(node="hq", role="server"))))
    child.next_event()
    return child, parent


def wire(msg: Message) -> bytes:
    return b"".join(bytes(b) for b in encode(msg))


def test_a_delta_round_trips() -> None:
    child, parent = opened()
    msg = Topology(nodes={"c1": b"client"}, removed=["c2"], reset=False)
    parent.receive_data(b"".join(bytes(b) for b in child.send(msg)))
    assert parent.next_event() == msg


def test_without_the_new_fields_it_replaces_the_subtree() -> None:
    """What a sender that knows only ``nodes`` means: the whole subtree."""
    msg = Topology(nodes={"c1": b"client"})
    assert msg.reset and msg.removed == []


def test_the_largest_batch_fits_a_frame_with_the_longest_names() -> None:
    # A full batch of 64-character names, each with a claim of the largest
    # size allowed, fits the header cap.
    names = {f"{i:05d}".ljust(64, "x"): b"c" * MAX_CLAIM for i in range(MAX_TOPOLOGY_BATCH)}
    child, parent = opened()
    parent.receive_data(b"".join(bytes(b) for b in child.send(Topology(nodes=names))))
    got = parent.next_event()
    assert isinstance(got, Topology) and len(got.nodes) == MAX_TOPOLOGY_BATCH


@pytest.mark.parametrize(
    "msg,why",
    [
        (Topology(nodes={f"c{i}": b"client" for i in range(MAX_TOPOLOGY_BATCH + 1)}), "more than"),
        (
            Topology(
                nodes={f"c{i}": b"client" for i in range(MAX_TOPOLOGY_BATCH)},
                removed=["x"],
                reset=False,
            ),
            "more than",
        ),
        (Topology(nodes={}, removed=["c1"], reset=True), "removes nothing"),
        (Topology(nodes={"c1": b"client"}, removed=["c1"], reset=False), "both adds and removes"),
    ],
)
def test_bad_batches_are_refused_on_both_sides(msg: Topology, why: str) -> None:
    child, parent = opened()
    with pytest.raises(LocalProtocolError, match=why):
        child.send(msg)
    parent.receive_data(wire(msg))
    with pytest.raises(RemoteProtocolError, match=why):
        parent.next_event()
