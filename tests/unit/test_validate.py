"""Every field a peer sends is checked by rdsd.validate before it is stored
or logged; values already stored are read back in range."""

from __future__ import annotations

import math

import pytest

from rdsd.domain import CLOCK_SKEW, DestState
from rdsd.validate import (
    MAX_DETAIL,
    MAX_SEQ,
    TIME_CEILING,
    TIME_FLOOR,
    Invalid,
    check_expiry,
    check_seq,
    check_state,
    check_time,
    clamp_time,
    clean_text,
    read_state,
)

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    "value",
    [1e300, -1e18, math.nan, math.inf, -math.inf, 0, 0.0, TIME_FLOOR - 1, NOW + CLOCK_SKEW + 1,
     2**1100, True, "1800000000", None],
)  # fmt: skip
def test_times_outside_the_window_are_refused(value: object) -> None:
    with pytest.raises(Invalid):
        check_time(value, NOW)


def test_times_inside_the_window_pass() -> None:
    assert check_time(NOW, NOW) == NOW
    assert check_time(int(NOW), NOW) == NOW
    assert check_time(NOW + CLOCK_SKEW, NOW) == NOW + CLOCK_SKEW
    assert check_time(TIME_FLOOR, NOW) == TIME_FLOOR


def test_a_refusal_says_how_far_ahead() -> None:
    with pytest.raises(Invalid, match=r"report time is 600s ahead .*at most 300s"):
        check_time(NOW + 600, NOW, "report time")


@pytest.mark.parametrize("value", [-1, 2**63, 2**64, 1.0, True, "1", None])
def test_seq_outside_int64_or_not_an_int_is_refused(value: object) -> None:
    with pytest.raises(Invalid):
        check_seq(value)


def test_seq_bounds_pass() -> None:
    assert check_seq(0) == 0 and check_seq(MAX_SEQ) == MAX_SEQ


@pytest.mark.parametrize("value", ["bogus", "", "INSTALLED", "installed\n", 3, None])
def test_states_are_the_enum_only(value: object) -> None:
    with pytest.raises(Invalid):
        check_state(value)


def test_known_states_pass() -> None:
    for state in DestState:
        assert check_state(str(state)) is state


@pytest.mark.parametrize("value", [1e300, -1.0, math.nan, NOW + 11 * 366 * 86400, "x"])
def test_expiries_out_of_range_are_refused(value: object) -> None:
    with pytest.raises(Invalid):
        check_expiry(value, NOW)


def test_an_expiry_ten_years_ahead_passes() -> None:
    assert check_expiry(NOW + 10 * 365 * 86400, NOW) == NOW + 10 * 365 * 86400


def test_text_is_bounded_and_control_characters_escaped() -> None:
    assert clean_text("exit 1: no space") == "exit 1: no space"
    assert clean_text("a\nb\x1b[31mc\x00") == "a\\nb\\x1b[31mc\\x00"
    huge = clean_text("x" * 200_210)
    assert len(huge) == MAX_DETAIL and huge.endswith("…")
    assert len(clean_text("\n" * 5000)) <= MAX_DETAIL
    assert clean_text("ünïcode ✓") == "ünïcode ✓"


def test_stored_values_read_back_in_range() -> None:
    assert clamp_time(None) is None
    assert clamp_time(1e300) == TIME_CEILING
    assert clamp_time(-1e18) == 0.0
    assert clamp_time(math.inf) == TIME_CEILING
    assert clamp_time(math.nan) == 0.0
    assert clamp_time("junk") == 0.0
    assert clamp_time(NOW) == NOW
    assert read_state("bogus") is DestState.FAILED
    assert read_state("installed") is DestState.INSTALLED
