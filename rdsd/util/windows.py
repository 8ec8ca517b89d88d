"""Deciding against time windows: is work allowed now, and if not, when.

Windows are ``(start, end)`` minutes after midnight as ``parse_window``
reads them, on the node's local clock. A piece of work may be bound by
several sets at once (the node's transfer windows and its job's own
windows): it may run when every set has a window open. Every function takes
``now`` (epoch seconds) as an argument, so the decisions are tested with a
fake clock; only the callers read the real one.

Local time is read through ``time.localtime``; a day on which the clock
jumps (summer time) is taken minute by minute as the clock shows it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence

from ..domain import JobPace
from .parse import (
    MINUTES_PER_DAY,
    check_rate,
    format_window,
    in_windows,
    next_window_start,
    parse_window,
)

__all__ = [
    "Windows",
    "describe_hold",
    "format_windows",
    "is_open",
    "local_minute",
    "opens_at",
    "pace_from_wire",
    "pace_to_wire",
]

Windows = Sequence[tuple[int, int]]

#: How far ahead ``opens_at`` looks for a moment when all sets are open;
#: sets that never overlap (a day has 1440 minutes) are "never".
_HORIZON_DAYS = 2


def local_minute(now: float) -> int:
    """Minutes after local midnight at ``now``."""
    t = time.localtime(now)
    return t.tm_hour * 60 + t.tm_min


def is_open(sets: Iterable[Windows], now: float) -> bool:
    """Is every set of windows open at ``now``? An empty set restricts nothing."""
    minute = local_minute(now)
    return all(in_windows(ws, minute) for ws in sets)


def opens_at(sets: Iterable[Windows], now: float) -> float:
    """When work bound by ``sets`` may next run: ``now`` if it may run now,
    else the epoch second at which every set is open together (the start
    of that minute), or ``math.inf`` if they never are."""
    chosen = [list(ws) for ws in sets if ws]
    if not chosen or is_open(chosen, now):
        return now
    t = now - (now % 60)  # the start of this minute (zones are whole minutes but a few)
    limit = now + _HORIZON_DAYS * MINUTES_PER_DAY * 60
    while t <= limit:
        minute = local_minute(t)
        wait = max(next_window_start(ws, minute) for ws in chosen)
        if wait == 0:
            return max(t, now)
        t += wait * 60
    return math.inf


def format_windows(windows: Windows) -> str:
    """``22:00-06:00, 12:00-13:00``; ``any time`` for no windows."""
    return ", ".join(format_window(w) for w in windows) if windows else "any time"


def describe_hold(kind: str, at: float) -> str:
    """The detail status shows while work waits for a window:
    ``waiting for window 22:00 (transfer, opens 2026-12-02T21:00:00Z)``, or
    that no window ever opens (sets that never overlap)."""
    if math.isinf(at):
        return f"waiting for a {kind} window: the node's and the job's windows never overlap"
    clock = time.strftime("%H:%M", time.localtime(at))
    utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
    return f"waiting for window {clock} ({kind}, opens {utc})"


def pace_to_wire(pace: JobPace) -> tuple[float, list[str]]:
    """A job's rate and windows as JOB_NOTICE and JOB_ANNOUNCE carry them."""
    return pace.rate, [format_window(w) for w in pace.windows]


def pace_from_wire(rate: float, windows: Sequence[str]) -> JobPace:
    """The job's rate and windows from a JOB_NOTICE or JOB_ANNOUNCE. Refuses
    (ConfigError) what no rdsd writes: a bad window or rate."""
    return JobPace(
        check_rate(float(rate), what="job rate"),
        tuple(parse_window(w, what="job window") for w in windows),
    )
