"""Refusal lines are rate-limited per peer, and a relay's TOPOLOGY snapshot
lists parents before the nodes under them."""

from __future__ import annotations

from rdsd.node.housekeeping import parents_first
from rdsd.parent.handlers import REFUSAL_WINDOW, REFUSALS_PER_WINDOW, Refusals


def test_refusals_are_logged_a_few_times_per_window_per_peer() -> None:
    limit = Refusals()
    admitted = [limit.admit("relay1", 100.0 + i * 0.01) for i in range(50)]
    assert admitted[:REFUSALS_PER_WINDOW] == [0] * REFUSALS_PER_WINDOW
    assert admitted[REFUSALS_PER_WINDOW:] == [None] * (50 - REFUSALS_PER_WINDOW)
    # Another peer has its own allowance.
    assert limit.admit("client7", 100.5) == 0
    # The next window says how many were held back.
    assert limit.admit("relay1", 100.0 + REFUSAL_WINDOW) == 50 - REFUSALS_PER_WINDOW


def test_a_snapshot_lists_parents_first() -> None:
    claims: dict[str, tuple[bytes, str | None]] = {
        "c9": (b"", "relay3"),
        "relay3": (b"", "relay2"),
        "c1": (b"", "me"),
        "relay2": (b"", "me"),
        "loop-a": (b"", "loop-b"),
        "loop-b": (b"", "loop-a"),
    }
    order = parents_first(claims)
    assert sorted(order) == sorted(claims)
    assert order.index("relay2") < order.index("relay3") < order.index("c9")
