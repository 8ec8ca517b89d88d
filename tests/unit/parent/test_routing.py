"""The parent half's routing, as pure functions on plain records."""

from __future__ import annotations

from rdsd.domain import DestState
from rdsd.parent.routing import (
    CANCEL_SENT,
    NOTICE_BATCH,
    by_hop,
    judge_topology,
    made_below,
    plan_push,
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


def test_topology_cannot_take_a_node_from_another_live_route() -> None:
    known = {
        "c1": ("client", "relay2", False),  # behind relay2, which is connected
        "c2": ("client", "relay9", False),  # behind a relay that is gone
        "c3": ("client", None, True),  # revoked
        "c4": ("client", "relay1", False),  # already ours
    }
    claimed = {"c1": "client", "c2": "client", "c3": "client", "c4": "client", "c5": "client"}
    plan = judge_topology("hq", "relay1", claimed, known, {"relay1", "relay2"})
    assert plan.refused == [("c1", "relay2")]
    assert sorted(plan.moves) == [("c2", "client"), ("c5", "client")]
    assert plan.keep == {"relay1", "c2", "c4", "c5"}
