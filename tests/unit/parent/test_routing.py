"""The parent half's routing, as pure functions on plain records."""

from __future__ import annotations

from protocol import MAX_REVOKED_BATCH, Revoked
from protocol.frames import MAX_HEADER, encode
from rdsd.claims import Attach
from rdsd.domain import DestState, NodeClaim, Role
from rdsd.parent.routing import (
    CANCEL_SENT,
    NOTICE_BATCH,
    by_hop,
    cancel_batches,
    judge_topology,
    made_below,
    plan_push,
    revoked_batches,
    route_name,
)

W, C, X = DestState.WAITING, DestState.CANCELLED, DestState.TRANSFERRING


def test_route_name_prefers_the_node_itself_then_its_relay() -> None:
    live = {"c1", "relay1"}
    assert route_name("c1", live, "relay1") == "c1"
    assert route_name("c2", live, "relay1") == "relay1"
    assert route_name("c3", live, "relay9") is None
    assert route_name("c4", live, None) is None


def test_by_hop_groups_by_live_child_and_leaves_out_ourselves() -> None:
    rows = [
        ("c1", W, 0, "c1"),
        ("c2", W, 0, "relay1"),
        ("c3", X, 1, "relay1"),
        ("c4", W, 0, "relay2"),  # relay2 is not connected
        ("hq", W, 0, None),  # ourselves
    ]
    assert by_hop("hq", rows, {"c1", "relay1"}) == {
        "c1": [("c1", W, 0)],
        "relay1": [("c2", W, 0), ("c3", X, 1)],
    }


def test_plan_push_batches_notices_and_marks_what_was_told() -> None:
    nodes = [(f"n{i}", W, 0) for i in range(NOTICE_BATCH + 5)]
    push, marks = plan_push("j1", nodes, {}, fresh_only=True)
    assert [len(batch) for _, batch in push.notices] == [NOTICE_BATCH, 5]
    assert len(marks) == NOTICE_BATCH + 5 and set(marks.values()) == {0}
    assert push.cancels == []


def test_plan_push_skips_what_this_session_was_told_unless_asked_again() -> None:
    told = {("j1", "a"): 0, ("j1", "b"): 0}
    items = [("a", W, 0), ("b", W, 1), ("c", W, 0)]
    push, marks = plan_push("j1", items, told, fresh_only=True)
    assert push.notices == [(1, ["b"]), (0, ["c"])]  # b was retried: a new generation
    assert marks == {("j1", "b"): 1, ("j1", "c"): 0}
    again, _ = plan_push("j1", items, told, fresh_only=False)  # a PENDING_QUERY
    assert sorted(n for _, batch in again.notices for n in batch) == ["a", "b", "c"]


def test_a_cancel_is_told_once_per_session() -> None:
    push, marks = plan_push("j1", [("a", C, 0)], {}, fresh_only=True)
    assert push.cancels == ["a"] and push.notices == []
    assert marks == {("j1", "a"): CANCEL_SENT}
    push, _ = plan_push("j1", [("a", C, 0)], marks, fresh_only=True)
    assert push.cancels == []


def test_a_job_made_below_is_not_sent_back_down() -> None:
    assert made_below("relay1", "relay1", None)
    assert made_below("client7", "relay1", "relay1")
    assert not made_below("hq", "relay1", None)


def _claim(node: str, parent: str, counter: int = 10, role: Role = Role.CLIENT) -> Attach:
    return Attach(node, role, parent, counter, 1.8e9, f"{node}/{parent}/{counter}".encode())


def _known(
    name: str,
    via: str | None,
    claim: Attach | None = None,
    role: Role = Role.CLIENT,
    revoked: bool = False,
) -> NodeClaim:
    return NodeClaim(
        name,
        role,
        via,
        revoked,
        b"key",
        claim.raw if claim else None,
        claim.counter if claim else None,
        claim.parent if claim else None,
    )


def test_topology_believes_only_a_nodes_newest_claim() -> None:
    """A relay can carry a node's claim, not make one: a claim older than
    the newest accepted (or another with the same counter) is a replay."""
    old = _claim("c1", "relay2", counter=5)
    newer = _claim("c1", "relay2", counter=9)
    known = {
        "c1": _known("c1", "relay2", newer),
        "c3": _known("c3", None, revoked=True),
        "c4": _known("c4", "relay1", _claim("c4", "relay1")),
    }
    claims = {
        "c1": _claim("c1", "relay1", counter=5),  # older than what c1 said since
        "c3": _claim("c3", "relay1"),  # revoked: left out
        "c4": _claim("c4", "relay1"),  # the same claim again: already ours
        "c5": _claim("c5", "relay1"),
    }
    plan = judge_topology("hq", "relay1", claims, known, {"relay1", "relay2"})
    assert [name for name, _ in plan.refused] == ["c1"]
    assert "replay" in plan.refused[0][1]
    assert [m[0] for m in plan.moves] == ["c5"]
    assert plan.keep == {"relay1", "c4", "c5"}
    assert old.counter < newer.counter


def test_a_newer_claim_moves_a_node_even_from_another_relay() -> None:
    known = {"c1": _known("c1", "relay2", _claim("c1", "relay2", counter=5))}
    plan = judge_topology("hq", "relay1", {"c1": _claim("c1", "relay1", 6)}, known, {"relay2"})
    assert [m[0] for m in plan.moves] == ["c1"] and not plan.refused


def test_a_direct_child_stays_ours() -> None:
    plan = judge_topology("hq", "relay1", {"c1": _claim("c1", "relay1", 99)}, {}, {"c1"})
    assert not plan.moves and not plan.refused and plan.keep == {"relay1"}


def test_the_chain_of_claims_must_lead_to_the_relay() -> None:
    """c2 sits under relay2 (itself under relay1, in the same message, listed
    after it); c3 names a parent nobody proved is below relay1; c4 names a
    client as its parent; c5 and c6 name each other."""
    claims = {
        "c2": _claim("c2", "relay2"),
        "relay2": _claim("relay2", "relay1", role=Role.RELAY),
        "c3": _claim("c3", "relay9"),
        "c4": _claim("c4", "c2"),
        "c5": _claim("c5", "c6"),
        "c6": _claim("c6", "c5"),
    }
    plan = judge_topology("hq", "relay1", claims, {}, {"relay1"})
    assert sorted(m[0] for m in plan.moves) == ["c2", "relay2"]
    assert sorted(n for n, _ in plan.refused) == ["c3", "c4", "c5", "c6"]


def test_a_chain_may_lead_through_a_relay_already_routed() -> None:
    relay2 = _claim("relay2", "relay1", role=Role.RELAY)
    known = {"relay2": _known("relay2", "relay1", relay2, role=Role.RELAY)}
    plan = judge_topology("hq", "relay1", {"c2": _claim("c2", "relay2")}, known, {"relay1"})
    assert [m[0] for m in plan.moves] == ["c2"]
    # Not when that relay is routed elsewhere.
    known = {"relay2": _known("relay2", "relay7", relay2, role=Role.RELAY)}
    plan = judge_topology("hq", "relay1", {"c2": _claim("c2", "relay2")}, known, {"relay1"})
    assert not plan.moves and plan.refused[0][0] == "c2"


def test_a_long_revocation_list_goes_in_batches_each_inside_the_header_cap() -> None:
    names = [f"n{i:05d}-{'x' * 57}" for i in range(2 * MAX_REVOKED_BATCH + 1)]
    batches = revoked_batches(names)
    assert [len(b.nodes) for b in batches] == [MAX_REVOKED_BATCH, MAX_REVOKED_BATCH, 1]
    assert [b.more for b in batches] == [True, True, False]
    assert [n for b in batches for n in b.nodes] == names
    for batch in batches:
        prefix = encode(batch)[0]
        assert len(prefix) < MAX_HEADER
    # The flag is sparse: a list that fits in one message looks as before.
    assert revoked_batches(["a"]) == [Revoked(nodes=["a"])]
    assert b"more" not in encode(Revoked(nodes=["a"]))[0]


def test_an_empty_revocation_list_is_one_message_that_clears() -> None:
    assert revoked_batches([]) == [Revoked(nodes=[], more=False)]


def test_a_cancel_for_many_nodes_goes_in_batches() -> None:
    nodes = [f"c{i:05d}-{'x' * 57}" for i in range(2 * NOTICE_BATCH + 3)]
    batches = cancel_batches("j1", nodes)
    assert [len(b.destinations) for b in batches] == [NOTICE_BATCH, NOTICE_BATCH, 3]
    assert {b.job for b in batches} == {"j1"}
    assert [n for b in batches for n in b.destinations] == nodes
    assert all(len(encode(b)[0]) < MAX_HEADER for b in batches)
    assert cancel_batches("j1", []) == []
