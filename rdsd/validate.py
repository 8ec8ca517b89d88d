"""What a value from a peer may be, as pure functions.

Every field a child or relay sends (a report's time, seq, state and detail,
a relay's holdings expiries, a claim's time) is checked here before it
touches the database or a log line, and what a database already holds is
read back through the ``clamp_*`` and ``read_*`` helpers, so one bad value
(``1e300``, ``NaN``, ``2**63``, ``bogus``) can neither crash a handler nor
break a listing. Nothing here does I/O; ``tests/unit/test_validate.py``
drives it directly.
"""

from __future__ import annotations

import math

from .domain import CLOCK_SKEW, DestState

#: No rdsd node existed before this (2000-01-01T00:00:00Z): an earlier time
#: is a broken clock or a lie.
TIME_FLOOR = 946_684_800.0
#: The latest time a listing shows; later stored values are read as this.
TIME_CEILING = 253_402_300_799.0  # 9999-12-31T23:59:59Z
#: Sequence numbers and counters are signed 64-bit in SQLite.
MAX_SEQ = 2**63 - 1
#: A report's detail (a failure reason, transfer progress) kept and logged.
MAX_DETAIL = 1000
#: A package is kept at most ten years (``--keep``); an expiry further
#: ahead than that (plus the skew) is not one a relay can hold.
MAX_KEEP_AHEAD = 10 * 366 * 86400.0 + CLOCK_SKEW


class Invalid(ValueError):
    """A field from a peer is out of its type or range; the message says
    which and why, in words safe for a log line."""


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Invalid(f"{what} is not a number")
    try:
        out = float(value)
    except OverflowError:
        raise Invalid(f"{what} is out of range") from None
    if not math.isfinite(out):
        raise Invalid(f"{what} is not finite")
    return out


def check_time(value: object, now: float, what: str = "time") -> float:
    """A time a peer says something happened: finite, not before
    ``TIME_FLOOR``, not ahead of ``now`` by more than ``CLOCK_SKEW``."""
    t = _number(value, what)
    if t < TIME_FLOOR:
        raise Invalid(f"{what} {t:.0f} is before the year 2000")
    if t > now + CLOCK_SKEW:
        raise Invalid(
            f"{what} is {t - now:.0f}s ahead of this node's clock "
            f"(at most {CLOCK_SKEW:.0f}s allowed)"
        )
    return t


def check_expiry(value: object, now: float, what: str = "expiry") -> float:
    """A package expiry a relay holds: finite, after ``TIME_FLOOR``, at most
    the longest keep time ahead."""
    t = _number(value, what)
    if t < TIME_FLOOR or t > now + MAX_KEEP_AHEAD:
        raise Invalid(f"{what} {t:.6g} is outside the years 2000 to now plus ten years")
    return t


def check_seq(value: object, what: str = "seq") -> int:
    """A sequence number or counter: a whole number in 0 .. 2**63-1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"{what} is not a whole number")
    if not 0 <= value <= MAX_SEQ:
        raise Invalid(f"{what} is outside 0..2^63-1")
    return value


def check_state(value: object) -> DestState:
    """A destination state, one of ``DestState``."""
    try:
        return DestState(str(value))
    except ValueError:
        raise Invalid(f"state {clean_text(str(value), 40)!r} is not a destination state") from None


def clean_text(text: str, limit: int = MAX_DETAIL) -> str:
    """Free text from a peer made safe to keep and log: control and other
    unprintable characters escaped (``\\n`` becomes the two characters
    ``\\`` ``n``), then cut to ``limit`` characters with an ellipsis."""
    if text.isprintable() and len(text) <= limit:
        return text
    out = []
    size = 0
    for ch in text:
        piece = ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
        size += len(piece)
        if size > limit:
            break
        out.append(piece)
    cleaned = "".join(out)
    if size > limit:
        cleaned = cleaned[: max(limit - 1, 0)] + "…"
    return cleaned


# -- reading back what a database holds -------------------------------------------


def clamp_time(value: object) -> float | None:
    """A stored time as a listing may show it: None stays None, anything
    that is not a finite number in the years 1970 to 9999 is brought inside
    them (databases written before values were checked may hold 1e300)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    t = float(value)
    if math.isnan(t):
        return 0.0
    return min(max(t, 0.0), TIME_CEILING)


def read_state(value: object) -> DestState:
    """A stored state; anything that is not one (``bogus``, stored before
    states were checked) reads as ``failed``, which a retry can restart."""
    try:
        return DestState(str(value))
    except ValueError:
        return DestState.FAILED


__all__ = [
    "MAX_DETAIL",
    "MAX_KEEP_AHEAD",
    "MAX_SEQ",
    "TIME_CEILING",
    "TIME_FLOOR",
    "Invalid",
    "check_expiry",
    "check_seq",
    "check_state",
    "check_time",
    "clamp_time",
    "clean_text",
    "read_state",
]
