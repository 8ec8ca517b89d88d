"""The rate limit on ``child.tls_failed`` lines and its summary count."""

from __future__ import annotations

from rdsd.parent.downlinks import HANDSHAKE_LOG_BURST, HANDSHAKE_LOG_INTERVAL, HandshakeLog


def test_held_back_failures_are_counted_for_the_summary() -> None:
    log = HandshakeLog()
    assert log.admit("a", 0.0) == 0
    assert log.admit("a", 1.0) is None
    assert log.admit("a", 2.0) is None
    assert log.admit("b", 2.5) == 0
    assert log.admit("b", 3.0) is None
    assert log.summary() == (3, 2)
    assert log.summary() == (0, 0)  # counted once
    # After the interval the host's next line says how many went unlogged.
    assert log.admit("a", HANDSHAKE_LOG_INTERVAL + 1) == 2


def test_burst_cap_across_hosts() -> None:
    log = HandshakeLog()
    admitted = [log.admit(f"h{i}", 0.0) for i in range(HANDSHAKE_LOG_BURST + 5)]
    assert admitted.count(0) == HANDSHAKE_LOG_BURST
    assert log.summary() == (5, 5)
