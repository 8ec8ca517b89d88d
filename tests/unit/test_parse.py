"""Operator input parsers: each good spelling gives the right value, each
bad one a single-line ConfigError that names the value and what is allowed."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import is_package_id
from rdsd.errors import ConfigError, UserError
from rdsd.util.parse import (
    MAX_DURATION,
    check_group_name,
    check_install_command,
    check_job_id,
    check_node_name,
    check_package_name,
    check_rate,
    check_seconds,
    check_size,
    check_version,
    format_address,
    format_duration,
    format_rate,
    format_size,
    format_window,
    in_windows,
    next_window_start,
    package_id,
    parse_address,
    parse_duration,
    parse_rate,
    parse_size,
    parse_time,
    parse_window,
    split_package_id,
)

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC).timestamp()
KiB, MiB, GiB = 2**10, 2**20, 2**30


def refused(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """The message of the ConfigError ``fn`` raises; it must be one line."""
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message, message
    assert isinstance(info.value, UserError)
    return message


# -- durations -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("15m", 900),
        ("12h", 43200),
        ("30d", 30 * 86400),
        ("1.5h", 5400),
        ("1.5s", 1.5),
        ("1500ms", 1.5),
        (" 10s ", 10),
        ("10 s", 10),
        ("3650d", MAX_DURATION),
        ("1s", 1),
    ],
)
def test_duration_good(text: str, seconds: float) -> None:
    value = parse_duration(text)
    assert value == seconds
    assert isinstance(value, float)


@pytest.mark.parametrize(
    ("text", "phrases"),
    [
        ("99999999d", ["'99999999d' is out of range", "at most 3650d (10 years)"]),
        ("3651d", ["out of range", "at most 3650d (10 years)"]),
        ("90", ["'90' has no unit", "like 90s"]),
        ("0s", ["must be more than zero"]),
        ("-5s", ["must be more than zero"]),
        ("500ms", ["out of range", "at least 1s"]),
        ("5x", ["has unit 'x'", "ms, s, m, h or d"]),
        ("10S", ["has unit 'S'"]),
        ("", ["is not a number with a unit"]),
        ("abc", ["is not a number with a unit"]),
        ("1e3s", ["is not a number with a unit"]),
        ("1" * 200 + "s", ["is too long"]),
        ("nan s", ["is not a number with a unit"]),
        ("\u0663s", ["is not a number with a unit"]),  # an Arabic-Indic three
    ],
)
def test_duration_bad(text: str, phrases: list[str]) -> None:
    message = refused(parse_duration, text)
    assert message.startswith("duration ")
    for phrase in phrases:
        assert phrase in message


def test_duration_bounds_and_name() -> None:
    assert parse_duration("250ms", minimum=0.01) == 0.25
    message = refused(parse_duration, "2h", maximum=3600, what="--keep")
    assert message == "--keep '2h' is out of range: at most 1h"
    assert refused(check_seconds, float("inf"), what="t").startswith("t inf is not a finite")
    assert check_seconds(10**3) == 1000.0
    assert "out of range" in refused(check_seconds, 10**400)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (90, "90s"),
        (5400, "90m"),
        (86400, "1d"),
        (0.25, "250ms"),
        (1.5, "1500ms"),
        (0.0005, "0.0005s"),
        (-60, "-1m"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.floats(min_value=0.001, max_value=MAX_DURATION))
def test_duration_round_trip(seconds: float) -> None:
    assert parse_duration(format_duration(seconds), minimum=0.001) == seconds


@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(["ms", "s", "m", "h", "d"]))
def test_duration_text_round_trip(number: int, unit: str) -> None:
    text = f"{number}{unit}"
    try:
        seconds = parse_duration(text, minimum=0.001)
    except ConfigError as exc:
        assert "at most" in str(exc)
        return
    assert parse_duration(format_duration(seconds), minimum=0.001) == seconds


# -- times -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-12-01T22:00:00Z", datetime(2026, 12, 1, 22, tzinfo=UTC)),
        ("2026-12-01T22:00:00", datetime(2026, 12, 1, 22, tzinfo=UTC)),
        ("2026-12-01T23:00:00+01:00", datetime(2026, 12, 1, 22, tzinfo=UTC)),
        ("2026-12-01 22:00", datetime(2026, 12, 1, 22, tzinfo=UTC)),
        ("2026-12-01", datetime(2026, 12, 1, tzinfo=UTC)),
        ("2026-06-01T11:59:30Z", datetime(2026, 6, 1, 11, 59, 30, tzinfo=UTC)),
    ],
)
def test_time_good(text: str, expected: datetime) -> None:
    assert parse_time(text, now=NOW) == expected.timestamp()


@pytest.mark.parametrize(
    ("text", "kwargs", "phrases"),
    [
        ("tomorrow", {}, ["'tomorrow' is not an ISO 8601 time", "2026-12-01T22:00:00Z"]),
        ("", {}, ["is not an ISO 8601 time"]),
        ("2026-13-01", {}, ["is not an ISO 8601 time"]),
        (
            "2020-01-01T00:00:00Z",
            {"what": "--at", "past_hint": "omit --at to run now"},
            ["--at '2020-01-01T00:00:00Z' is in the past", "; omit --at to run now"],
        ),
        ("2026-06-01T11:58:00Z", {}, ["is in the past"]),
        ("9999-12-31T23:59:59Z", {}, ["is too far ahead", "at most 2036-"]),
        ("9999-12-31T23:59:59Z", {"allow_past": True}, ["is too far ahead"]),
        ("2026-06-02T12:00:01Z", {"max_future": 86400}, ["is too far ahead"]),
        ("1960-01-01T00:00:00Z", {"allow_past": True}, ["is before 1970"]),
        ("0001-01-01T00:00:00+01:00", {"allow_past": True}, ["1970"]),
    ],
)
def test_time_bad(text: str, kwargs: dict[str, Any], phrases: list[str]) -> None:
    message = refused(parse_time, text, now=NOW, **kwargs)
    for phrase in phrases:
        assert phrase in message


def test_time_past_allowed_and_formattable() -> None:
    assert parse_time("2020-01-01T00:00:00Z", now=NOW, allow_past=True) == 1577836800.0
    # Anything accepted can be shown again.
    ts = parse_time("2036-05-01T00:00:00-12:00", now=NOW)
    assert datetime.fromtimestamp(ts, UTC).year == 2036


# -- sizes and rates -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("0", 0),
        ("1MiB", MiB),
        ("512KiB", 512 * KiB),
        ("1.5GB", 1_500_000_000),
        ("1.5GiB", 3 * GiB // 2),
        ("2kB", 2000),
        ("10B", 10),
        ("1 MiB", MiB),
        ("0.5B", 0),
        ("1TiB", 2**40),
    ],
)
def test_size_good(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "phrases"),
    [
        ("1KB", ["has unit 'KB'", "KiB", "kB"]),
        ("1mb", ["has unit 'mb'"]),
        ("2PiB", ["has unit 'PiB'"]),
        ("2000TiB", ["out of range", "at most 1024TiB"]),
        ("-1", ["must not be negative"]),
        ("MiB", ["is not a number with a unit"]),
        ("", ["is not a number with a unit"]),
    ],
)
def test_size_bad(text: str, phrases: list[str]) -> None:
    message = refused(parse_size, text)
    assert message.startswith("size ")
    for phrase in phrases:
        assert phrase in message


def test_size_bounds() -> None:
    assert refused(parse_size, "1KiB", minimum=4096, what="chunk") == (
        "chunk '1KiB' is out of range: at least 4KiB"
    )
    assert check_size(4096, minimum=4096) == 4096
    assert "at most" in refused(check_size, 10**400)


@given(st.integers(min_value=0, max_value=2**50))
def test_size_round_trip(size: int) -> None:
    assert parse_size(format_size(size)) == size


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("20MB/s", 20e6),
        ("500KiB/s", 500 * KiB),
        ("1Gbit/s", 125e6),
        ("100Mbit/s", 12.5e6),
        ("8kbit/s", 1000),
        ("8bit/s", 1),
        ("1000", 1000),
        ("1000B/s", 1000),
        ("1.5kB/s", 1500),
        ("20 MB / s", 20e6),
        ("0", 0.0),
        ("0MB/s", 0.0),
        ("unlimited", 0.0),
        ("Unlimited", 0.0),
    ],
)
def test_rate_good(text: str, rate: float) -> None:
    value = parse_rate(text)
    assert value == rate
    assert isinstance(value, float)


@pytest.mark.parametrize(
    ("text", "phrases"),
    [
        ("20MB", ["needs '/s' after the unit", "20MB/s"]),
        ("5Mbps", ["has unit 'Mbps'", "Mbit/s"]),
        ("5Mb/s", ["has unit 'Mb'"]),
        ("-1MB/s", ["must not be negative", "0 means unlimited"]),
        ("0.5", ["out of range", "at least 1B/s", "0 = unlimited"]),
        ("2TB/s", ["out of range", "at most 1TB/s"]),
        ("fast", ["is not a rate like 20MB/s"]),
    ],
)
def test_rate_bad(text: str, phrases: list[str]) -> None:
    message = refused(parse_rate, text)
    assert message.startswith("rate ")
    for phrase in phrases:
        assert phrase in message


def test_rate_numbers() -> None:
    assert check_rate(0) == 0.0
    assert check_rate(1500.5) == 1500.5
    assert "finite" in refused(check_rate, float("inf"))
    assert "negative" in refused(check_rate, -1)


@given(st.floats(min_value=1, max_value=1e12) | st.just(0.0))
def test_rate_round_trip(rate: float) -> None:
    assert parse_rate(format_rate(rate)) == rate


# -- windows ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "window"),
    [
        ("08:00-17:30", (480, 1050)),
        ("22:00-06:00", (1320, 360)),
        ("00:00-24:00", (0, 1440)),
        ("23:00-24:00", (1380, 1440)),
        ("8:00-9:00", (480, 540)),
        (" 08:00 - 09:00 ", (480, 540)),
        ("23:59-00:00", (1439, 0)),
    ],
)
def test_window_good(text: str, window: tuple[int, int]) -> None:
    assert parse_window(text) == window


@pytest.mark.parametrize(
    ("text", "phrases"),
    [
        ("06:00-06:00", ["starts and ends at the same time", "00:00-24:00 is all day"]),
        ("00:00-00:00", ["starts and ends at the same time"]),
        ("25:00-06:00", ["has the clock '25:00'", "00:00 to 23:59"]),
        ("24:00-06:00", ["has the clock '24:00'", "00:00 to 23:59"]),
        ("06:00-24:01", ["has the clock '24:01'", "00:00 to 24:00"]),
        ("06:60-07:00", ["has the clock '06:60'"]),
        ("0600-0700", ["is not HH:MM-HH:MM"]),
        ("06:00", ["is not HH:MM-HH:MM"]),
        ("6-7", ["is not HH:MM-HH:MM"]),
        ("\u0663:00-04:00", ["is not HH:MM-HH:MM"]),
    ],
)
def test_window_bad(text: str, phrases: list[str]) -> None:
    message = refused(parse_window, text)
    assert message.startswith("window ")
    for phrase in phrases:
        assert phrase in message


NIGHT = parse_window("22:00-06:00")
LUNCH = parse_window("12:00-13:00")


@pytest.mark.parametrize(
    ("windows", "minute", "inside", "wait"),
    [
        ([NIGHT], 23 * 60, True, 0),
        ([NIGHT], 0, True, 0),
        ([NIGHT], 5 * 60 + 59, True, 0),
        ([NIGHT], 6 * 60, False, 16 * 60),  # the end minute is outside
        ([NIGHT], 21 * 60 + 59, False, 1),
        ([NIGHT], 22 * 60, True, 0),
        ([NIGHT, LUNCH], 9 * 60, False, 3 * 60),
        ([NIGHT, LUNCH], 13 * 60, False, 9 * 60),
        ([LUNCH], 14 * 60, False, 22 * 60),  # tomorrow's lunch
        ([(0, 1440)], 1439, True, 0),
        ([], 600, True, 0),  # no windows: no restriction
        ([LUNCH], 12 * 60 + 1440, True, 0),  # minutes wrap at a day
    ],
)
def test_windows(windows: list[tuple[int, int]], minute: int, inside: bool, wait: int) -> None:
    assert in_windows(windows, minute) is inside
    assert next_window_start(windows, minute) == wait
    if wait:
        assert in_windows(windows, minute + wait)
        assert not in_windows(windows, minute + wait - 1)


@given(st.integers(0, 1439), st.integers(1, 1440))
def test_window_round_trip(start: int, end: int) -> None:
    if start == end:
        return
    text = format_window((start, end))
    assert parse_window(text) == (start, end)


# -- names -----------------------------------------------------------------

NAME_CHECKS = [
    (check_node_name, "node name"),
    (check_group_name, "group name"),
    (check_job_id, "job id"),
]


@pytest.mark.parametrize(("check", "what"), NAME_CHECKS)
@pytest.mark.parametrize("name", ["relay-1", "a", "x" * 64, "node.example_1", ".hidden", "a..b"])
def test_names_good(check: Callable[[str], str], what: str, name: str) -> None:
    assert check(name) == name


@pytest.mark.parametrize(("check", "what"), NAME_CHECKS)
@pytest.mark.parametrize("name", ["", "x" * 65, "..", ".", "a/b", "a b", "a\0b", "ä", "group:x"])
def test_names_bad(check: Callable[[str], str], what: str, name: str) -> None:
    message = refused(check, name)
    assert message.startswith(f"{what} {name!r} is not allowed")
    assert "1 to 64 of A-Z a-z 0-9 . _ -" in message


# -- package ids -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "version", "pid"),
    [
        ("my-app-1", "2", "my-app-1-2"),
        ("my-app", "2.0", "my-app-2.0"),
        ("app", "1.4.2_rc1", "app-1.4.2_rc1"),
        ("a.b", "v1", "a.b-v1"),
        (".app", "1", ".app-1"),
        ("x" * 64, "9" * 64, "x" * 64 + "-" + "9" * 64),
    ],
)
def test_package_id_good(name: str, version: str, pid: str) -> None:
    assert package_id(name, version) == pid
    assert split_package_id(pid) == (name, version)
    assert is_package_id(pid)


def test_package_id_collision_is_gone() -> None:
    # Before, (my-app-1, 2) and (my-app, 1-2) both made my-app-1-2.
    pid = package_id("my-app-1", "2")
    assert split_package_id(pid) == ("my-app-1", "2")
    message = refused(package_id, "my-app", "1-2")
    assert message.startswith("version '1-2' contains '-'")
    assert "(like '1_2')" in message


@pytest.mark.parametrize(
    ("name", "phrases"),
    [
        ("", ["is not allowed"]),
        ("x" * 65, ["is not allowed", "1 to 64"]),
        ("-app", ["starts or ends with '-'"]),
        ("app-", ["starts or ends with '-'"]),
        ("my--app", ["has '--'"]),
        ("..", ["only dots"]),
        ("a-..-b", ["only dots"]),
        ("a/b", ["is not allowed"]),
    ],
)
def test_package_name_bad(name: str, phrases: list[str]) -> None:
    message = refused(check_package_name, name)
    assert message.startswith(f"package name {name!r}")
    for phrase in phrases:
        assert phrase in message


@pytest.mark.parametrize("version", ["", "1-2", "..", "1/2", "x" * 65, "1 2"])
def test_version_bad(version: str) -> None:
    message = refused(check_version, version)
    assert message.startswith(f"version {version!r}")
    assert "no '-'" in message


@pytest.mark.parametrize(
    ("pid", "phrase"),
    [
        ("app", "is not NAME-VERSION (like my-app-2.0)"),
        ("app-", "is not NAME-VERSION (like my-app-2.0)"),
        ("-1", "is not NAME-VERSION (like my-app-2.0)"),
        ("my--1", "package name 'my-' starts or ends with '-'"),
        ("..-1", "only dots"),
        ("app-..", "version '..'"),
    ],
)
def test_split_package_id_bad(pid: str, phrase: str) -> None:
    message = refused(split_package_id, pid)
    assert message.startswith(f"package id {pid!r}")
    assert phrase in message


_NAME_PART = st.text("abcXYZ019._", min_size=1, max_size=10).filter(lambda p: p.strip(".") != "")


@given(
    st.lists(_NAME_PART, min_size=1, max_size=5).map("-".join).filter(lambda n: len(n) <= 64),
    st.text("abcXYZ019._", min_size=1, max_size=64).filter(lambda v: v.strip(".") != ""),
)
def test_package_id_round_trip(name: str, version: str) -> None:
    pid = package_id(name, version)
    assert is_package_id(pid)
    assert split_package_id(pid) == (name, version)


@given(st.text("ab1.-_", min_size=1, max_size=20), st.text("ab1.-_", min_size=1, max_size=20))
def test_package_ids_are_unambiguous(name: str, version: str) -> None:
    """Whatever is accepted splits back to itself; nothing else is."""
    try:
        pid = package_id(name, version)
    except ConfigError:
        return
    assert split_package_id(pid) == (name, version)
    assert is_package_id(pid)


# -- install commands and addresses -----------------------------------------


@pytest.mark.parametrize(
    ("text", "argv"),
    [
        ("./install.sh", ("./install.sh",)),
        ("sh -c 'echo hi'", ("sh", "-c", "echo hi")),
        ('"sh -c \'echo"', ("sh -c 'echo",)),
        ("a\\ b c", ("a b", "c")),
    ],
)
def test_install_command_good(text: str, argv: tuple[str, ...]) -> None:
    assert check_install_command(text) == argv


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sh -c 'echo", '--install: no closing quotation in "sh -c \'echo"'),
        ("", "--install: '' has no command in it"),
        ("   ", "--install: '   ' has no command in it"),
        ("a\0b", "--install: a NUL byte is not allowed in 'a\\x00b'"),
        ("echo \\", "--install: nothing follows the last backslash in 'echo \\\\'"),
    ],
)
def test_install_command_bad(text: str, message: str) -> None:
    assert refused(check_install_command, text) == message


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:7700", ("127.0.0.1", 7700)),
        ("server.example.net:0", ("server.example.net", 0)),
        ("[::1]:7700", ("::1", 7700)),
        ("[fe80::1%eth0]:65535", ("fe80::1%eth0", 65535)),
        ("localhost:07700", ("localhost", 7700)),
    ],
)
def test_address_good(text: str, address: tuple[str, int]) -> None:
    assert parse_address(text) == address
    assert parse_address(format_address(address)) == address


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("host", "has no port"),
        ("host:99999", "has port '99999': use a number from 0 to 65535"),
        ("host:", "has port ''"),
        ("host:-1", "has port '-1'"),
        ("host:٣", "has port '٣'"),
        (":7700", "has host ''"),
        ("::1:7700", "put an IPv6 address in brackets"),
        ("[nope]:7700", "not an IPv6 address"),
        ("a b:7700", "has host 'a b'"),
        ("x" * 400 + ":1", "is too long"),
    ],
)
def test_address_bad(text: str, phrase: str) -> None:
    message = refused(parse_address, text, what="--listen")
    assert message.startswith("--listen ")
    assert phrase in message
