"""Waiting for a job from another process than the daemon: ``rdsd job wait``.

The command runs beside the daemon, so it cannot be woken by the daemon's
events; it watches the job database instead. SQLite's ``PRAGMA
data_version`` changes only when another connection commits, so each look is
one cheap PRAGMA, and the job is read again only when something changed.
The interval between looks is bounded (``POLL_INTERVAL``), and so is the
whole wait (``timeout``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from ..domain import DestState
from .ops import Admin

# How often the database is looked at: short enough for a live view, and a
# PRAGMA per look costs microseconds.
POLL_INTERVAL = 0.2
# A live view redraws at least this often, so rates and ETAs move on.
REDRAW_INTERVAL = 1.0

SUCCEEDED = frozenset({DestState.INSTALLED, DestState.STORED, DestState.OFFERED})


class WaitOutcome(IntEnum):
    """``rdsd job wait``'s exit status."""

    SUCCEEDED = 0  # every destination final, and none failed or cancelled
    FAILED = 1  # every destination final, some failed or were cancelled
    TIMED_OUT = 3  # not every destination was final within the timeout


@dataclass(frozen=True)
class Change:
    """One destination's state changed (or was first seen)."""

    node: str
    state: str
    detail: str
    before: str | None


def outcome_of(status: dict[str, Any]) -> WaitOutcome | None:
    """The job's outcome if every destination is final, else None."""
    states = [DestState(d["state"]) for d in status["destinations"]]
    if not all(s.final for s in states):
        return None
    return WaitOutcome.SUCCEEDED if all(s in SUCCEEDED for s in states) else WaitOutcome.FAILED


def changes(before: dict[str, str], status: dict[str, Any]) -> list[Change]:
    """State changes between the states seen last and ``status``."""
    return [
        Change(d["node"], d["state"], d["detail"], before.get(d["node"]))
        for d in status["destinations"]
        if before.get(d["node"]) != d["state"]
    ]


def wait_job(
    admin: Admin,
    jid: str,
    timeout: float | None,
    on_status: Callable[[dict[str, Any], list[Change]], None],
    clock: Callable[[], float] = time.monotonic,
) -> WaitOutcome:
    """Block until every destination of ``jid`` is final or ``timeout``
    seconds passed. ``on_status`` is called with the job's status and the
    state changes since the last call: at once, after each change in the
    database, and at least every REDRAW_INTERVAL (with no changes)."""
    deadline = None if timeout is None else clock() + timeout
    seen: dict[str, str] = {}
    version: int | None = None
    drawn = -float("inf")
    while True:
        now = clock()
        current = admin.data_version()
        if current != version or now - drawn >= REDRAW_INTERVAL:
            status = admin.job_status(jid)
            moved = changes(seen, status) if current != version else []
            version, drawn = current, now
            seen.update((c.node, c.state) for c in moved)
            on_status(status, moved)
            done = outcome_of(status)
            if done is not None:
                return done
        if deadline is not None and now >= deadline:
            return WaitOutcome.TIMED_OUT
        pause = POLL_INTERVAL if deadline is None else min(POLL_INTERVAL, deadline - now)
        time.sleep(max(pause, 0.0))
