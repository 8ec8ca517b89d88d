"""Window decisions on a fake clock, in the node's local time.

``TZ`` is set per test (POSIX zone strings, which need no zone database),
so the same epoch second is 12:00 in one test and 21:00 in another: windows
are read on the node's local clock."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from rdsd.domain import JobPace
from rdsd.errors import ConfigError
from rdsd.util.parse import parse_window
from rdsd.util.windows import (
    describe_hold,
    format_windows,
    is_open,
    local_minute,
    opens_at,
    pace_from_wire,
    pace_to_wire,
)

NIGHT = parse_window("22:00-06:00")
EARLY = parse_window("05:00-08:00")
LUNCH = parse_window("12:00-13:00")


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC0")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def at(text: str) -> float:
    """An ISO time in UTC as epoch seconds."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_local_minute_follows_the_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    noon = at("2026-12-02T12:00:30")
    assert local_minute(noon) == 12 * 60
    monkeypatch.setenv("TZ", "JST-9")
    time.tzset()
    assert local_minute(noon) == 21 * 60
    # 21:00 in Tokyo: the night window opens at 22:00 local, 13:00 UTC.
    assert opens_at([[NIGHT]], noon) == at("2026-12-02T13:00:00")


@pytest.mark.parametrize(
    ("now", "sets", "expected"),
    [
        ("2026-12-02T12:00:30", [[NIGHT]], "2026-12-02T22:00:00"),
        ("2026-12-02T23:30:00", [[NIGHT]], None),  # open: now
        ("2026-12-02T05:59:59", [[NIGHT]], None),
        ("2026-12-02T06:00:00", [[NIGHT]], "2026-12-02T22:00:00"),
        ("2026-12-02T12:00:00", [[NIGHT, LUNCH]], None),
        ("2026-12-02T13:00:00", [[NIGHT, LUNCH]], "2026-12-02T22:00:00"),
        # both the node's and the job's windows: the first minute both are open
        ("2026-12-02T12:00:00", [[NIGHT], [EARLY]], "2026-12-03T05:00:00"),
        ("2026-12-02T12:00:00", [[EARLY], [NIGHT]], "2026-12-03T05:00:00"),
        ("2026-12-02T12:00:00", [[], [NIGHT]], "2026-12-02T22:00:00"),
        ("2026-12-02T12:00:00", [[], []], None),
        ("2026-12-02T12:00:00", [], None),
    ],
)
def test_opens_at(now: str, sets: list[list[tuple[int, int]]], expected: str | None) -> None:
    t = at(now)
    assert opens_at(sets, t) == (t if expected is None else at(expected))
    assert is_open(sets, t) is (expected is None)


def test_windows_that_never_meet_never_open() -> None:
    assert opens_at([[NIGHT], [LUNCH]], at("2026-12-02T12:30:00")) == math.inf
    text = describe_hold("transfer", math.inf)
    assert "never overlap" in text


def test_a_window_ending_at_midnight() -> None:
    late = parse_window("23:00-24:00")
    assert is_open([[late]], at("2026-12-02T23:59:59"))
    assert not is_open([[late]], at("2026-12-03T00:00:00"))
    assert opens_at([[late]], at("2026-12-03T00:00:00")) == at("2026-12-03T23:00:00")


def test_describe_hold_says_until_when() -> None:
    text = describe_hold("install", at("2026-12-02T22:00:00"))
    assert text == "waiting for window 22:00 (install, opens 2026-12-02T22:00:00Z)"
    assert format_windows([NIGHT, LUNCH]) == "22:00-06:00, 12:00-13:00"
    assert format_windows([]) == "any time"


def test_job_pace_on_the_wire() -> None:
    pace = JobPace(2e6, (NIGHT, LUNCH))
    assert pace_to_wire(pace) == (2e6, ["22:00-06:00", "12:00-13:00"])
    assert pace_from_wire(*pace_to_wire(pace)) == pace
    assert pace_from_wire(0, []) == JobPace()
    with pytest.raises(ConfigError, match="job window"):
        pace_from_wire(0, ["22:00"])
    with pytest.raises(ConfigError, match="job rate"):
        pace_from_wire(-1, [])
