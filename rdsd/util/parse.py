"""Every value an operator types, checked in one place and one way.

The command line, ``rdsd.toml`` and the admin operations all take the same
kinds of values: durations, times, sizes, rates, time windows, names,
package ids, install commands and addresses. Each parser here returns the
value or raises ``ConfigError`` with one line that names the value, what is
wrong with it and what would be accepted, so a person can fix it without
reading the source. Every parser takes ``what``: the name the person knows
the value by (``--keep``, ``transfer.chunk_size``), which starts the message.

Bounds are part of the parse: a value that parses but cannot be meant
(``99999999d``, a chunk of a terabyte, a start time in the year 9999) is
refused here instead of overflowing somewhere far away. The ``format_*``
functions are the inverse for display and for writing ``rdsd.toml``: what
they produce parses back to the same value.
"""

from __future__ import annotations

import ipaddress
import math
import re
import shlex
from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

from protocol import is_package_id, is_safe_name

from ..errors import ConfigError

__all__ = [
    "DAY",
    "MAX_DURATION",
    "YEAR",
    "check_group_name",
    "check_install_command",
    "check_job_id",
    "check_node_name",
    "check_package_name",
    "check_rate",
    "check_seconds",
    "check_size",
    "check_version",
    "format_address",
    "format_duration",
    "format_rate",
    "format_size",
    "format_window",
    "in_windows",
    "next_window_start",
    "package_id",
    "parse_address",
    "parse_duration",
    "parse_rate",
    "parse_size",
    "parse_time",
    "parse_window",
    "split_package_id",
]

DAY = 86400
YEAR = 365 * DAY
#: The longest duration anything takes: ten years.
MAX_DURATION = 10 * YEAR
#: The longest time ahead a start time may be.
MAX_FUTURE = 10 * YEAR
#: How far in the past a start time may be and still mean "now": a command
#: typed a few seconds ago, or a clock a little behind, is not an error.
PAST_GRACE = 60.0
#: The largest size any setting takes: 1 PiB.
MAX_SIZE = 2**50
#: The fastest rate any setting takes: 1 TB/s, far above any link.
MAX_RATE = 10**12
#: The longest text any parser looks at; longer input is refused before any
#: number conversion, so no input can make parsing itself expensive.
MAX_TEXT = 128

_NUMBER = r"(?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
_AMOUNT_RE = re.compile(_NUMBER + r"\s*(?P<unit>[A-Za-z]*)")
_RATE_RE = re.compile(_NUMBER + r"\s*(?P<unit>[A-Za-z]*)(?P<per>\s*/\s*s)?")
_CLOCK_RE = re.compile(r"([0-9]{1,2}):([0-9]{2})")
_HOST_RE = re.compile(r"[A-Za-z0-9._-]{1,253}")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_VERSION_RE = re.compile(r"[A-Za-z0-9._]{1,64}")
_NAME_CHARS_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")

_DURATION_UNITS: dict[str, Decimal] = {
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
    "d": Decimal(DAY),
}
#: Largest first, so formatting picks the shortest exact spelling.
_DURATION_FORMAT = (("d", DAY * 1000), ("h", 3600 * 1000), ("m", 60 * 1000), ("s", 1000))

_BINARY = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_DECIMAL = {"kB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS: dict[str, int] = {"": 1, "B": 1, **_BINARY, **_DECIMAL}
_SIZE_UNIT_LIST = "B, KiB, MiB, GiB, TiB (1024) or kB, MB, GB, TB (1000)"
_SIZE_FORMAT = (*_BINARY.items(), *_DECIMAL.items())

_BITS = {"bit": 1, "kbit": 10**3, "Mbit": 10**6, "Gbit": 10**9}
_RATE_UNIT_LIST = "B/s, KiB/s, MiB/s, GiB/s, kB/s, MB/s, GB/s or kbit/s, Mbit/s, Gbit/s"
_UNLIMITED = "unlimited"

_NAME_RULE = "use 1 to 64 of A-Z a-z 0-9 . _ - and not only dots"
_PACKAGE_NAME_RULE = (
    "use 1 to 64 of A-Z a-z 0-9 . _ -, not starting or ending with '-', "
    "and no part between dashes empty or only dots"
)
_VERSION_RULE = "use 1 to 64 of A-Z a-z 0-9 . _ (no '-') and not only dots"


def _too_long(text: str, what: str) -> ConfigError:
    return ConfigError(f"{what} {text[:24]!r}... is too long: at most {MAX_TEXT} characters")


def _number(text: str) -> Decimal:
    """The decimal number the regexes matched; they only match valid ones."""
    try:
        return Decimal(text)
    except InvalidOperation:  # pragma: no cover - the pattern rules it out
        raise ConfigError(f"{text!r} is not a number") from None


def _exact_decimal(value: float) -> Decimal:
    """A float as the shortest decimal that converts back to it, so
    formatting and parsing again gives the same float."""
    return Decimal(repr(float(value)))


def _plain(d: Decimal) -> str:
    """A decimal without exponent or trailing zeros: 1.5, 0.0001, 200."""
    text = format(d, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


# -- durations -------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """Seconds as the shortest exact spelling ``parse_duration`` reads back:
    ``90`` is ``90s``, ``5400`` is ``90m``, ``0.25`` is ``250ms``; a value no
    whole unit fits is given in seconds with decimals (``0.0005s``)."""
    if not math.isfinite(seconds):
        return str(seconds)
    if seconds == 0:
        return "0s"
    sign = "-" if seconds < 0 else ""
    exact = abs(_exact_decimal(seconds))
    ms = exact * 1000
    if ms == ms.to_integral_value():
        whole = int(ms)
        for unit, size in _DURATION_FORMAT:
            if whole % size == 0:
                return f"{sign}{whole // size}{unit}"
        return f"{sign}{whole}ms"
    return f"{sign}{_plain(exact)}s"


def _duration_limit(seconds: float) -> str:
    """A bound for a message, with years spelled out where it helps."""
    text = format_duration(seconds)
    if seconds >= YEAR and seconds % YEAR == 0:
        years = int(seconds // YEAR)
        text += f" ({years} year{'s' if years != 1 else ''})"
    return text


def check_seconds(
    seconds: float,
    *,
    minimum: float = 1,
    maximum: float = MAX_DURATION,
    what: str = "duration",
    shown: str | None = None,
) -> float:
    """Bound a duration already in seconds (a number in ``rdsd.toml``).

    ``shown`` is how the value appears in the message; the number itself by
    default. Zero and negative durations are always refused: no setting
    means "never" or "immediately" by a duration of zero."""
    label = shown if shown is not None else repr(seconds)
    if isinstance(seconds, float) and not math.isfinite(seconds):
        raise ConfigError(f"{what} {label} is not a finite number of seconds")
    if seconds <= 0:
        raise ConfigError(
            f"{what} {label} must be more than zero (at least {format_duration(minimum)})"
        )
    if seconds < minimum:
        raise ConfigError(f"{what} {label} is out of range: at least {_duration_limit(minimum)}")
    if seconds > maximum:
        raise ConfigError(f"{what} {label} is out of range: at most {_duration_limit(maximum)}")
    return float(seconds)


def parse_duration(
    text: str,
    *,
    minimum: float = 1,
    maximum: float = MAX_DURATION,
    what: str = "duration",
) -> float:
    """``90s``, ``15m``, ``12h``, ``30d``, ``1.5h``, ``250ms`` to seconds.

    A number (whole or with decimals) and one unit of ``ms``, ``s``, ``m``,
    ``h``, ``d``. A bare number is refused: whether ``90`` means seconds or
    minutes is exactly the guess this module exists to avoid. The result
    must lie within ``minimum..maximum`` seconds; by default 1 s to 10
    years, so no duration can overflow a timestamp."""
    if len(text) > MAX_TEXT:
        raise _too_long(text, what)
    m = _AMOUNT_RE.fullmatch(text.strip())
    if m is None:
        raise ConfigError(
            f"{what} {text!r} is not a number with a unit ms, s, m, h or d (like 90s, 15m, 1.5h)"
        )
    unit = m["unit"]
    if unit == "":
        raise ConfigError(
            f"{what} {text!r} has no unit: add ms, s, m, h or d (like {m['number']}s)"
        )
    if unit not in _DURATION_UNITS:
        raise ConfigError(f"{what} {text!r} has unit {unit!r}: use ms, s, m, h or d")
    seconds = float(_number(m["number"]) * _DURATION_UNITS[unit])
    return check_seconds(seconds, minimum=minimum, maximum=maximum, what=what, shown=repr(text))


# -- points in time --------------------------------------------------------


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


#: A day short of the last time ``datetime`` can hold, so any local zone can show it.
_LAST = datetime(9999, 12, 30, tzinfo=UTC).timestamp()


def parse_time(
    text: str,
    *,
    now: float,
    allow_past: bool = False,
    max_future: float = MAX_FUTURE,
    what: str = "time",
    past_hint: str | None = None,
) -> float:
    """ISO 8601 to epoch seconds: ``2026-12-01T22:00:00Z``, ``...+01:00``,
    or without a zone, which means UTC (never the local zone of whichever
    machine parses it). A date alone is midnight UTC.

    Unless ``allow_past``, a time more than a minute before ``now`` is
    refused: a job meant to start at a past time was mistyped, and running
    it at once would be a surprise. ``past_hint`` is added to that message
    (``"omit --at to run now"``). Times before 1970 or more than
    ``max_future`` after ``now`` are refused too, so every accepted time can
    be shown and stored."""
    if len(text) > MAX_TEXT:
        raise _too_long(text, what)
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(
            f"{what} {text!r} is not an ISO 8601 time (like 2026-12-01T22:00:00Z)"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    try:
        ts = dt.timestamp()
    except (OverflowError, ValueError):  # pragma: no cover - offsets at year 1 or 9999
        raise ConfigError(f"{what} {text!r} is out of range") from None
    latest = min(now + max_future, _LAST)
    if ts > latest:
        raise ConfigError(f"{what} {text!r} is too far ahead: at most {_iso(latest)}")
    if not allow_past and ts < now - PAST_GRACE:
        hint = f"; {past_hint}" if past_hint else ""
        raise ConfigError(f"{what} {text!r} is in the past (now is {_iso(now)}){hint}")
    if ts < 0:
        raise ConfigError(f"{what} {text!r} is before 1970")
    return ts


# -- sizes and rates -------------------------------------------------------


def format_size(size: int) -> str:
    """Bytes as the shortest exact spelling ``parse_size`` reads back:
    ``1MiB``, ``4KiB``, ``1TB``, ``1500kB``, ``1234B``."""
    if size == 0:
        return "0B"
    exact = [(size // factor, unit) for unit, factor in _SIZE_FORMAT if size % factor == 0]
    if not exact:
        return f"{size}B"
    number, unit = min(exact)
    return f"{number}{unit}"


def parse_size(
    text: str,
    *,
    minimum: int = 0,
    maximum: int = MAX_SIZE,
    what: str = "size",
) -> int:
    """``4096``, ``512KiB``, ``1MiB``, ``1.5GB`` to bytes.

    KiB/MiB/GiB/TiB are powers of 1024 and kB/MB/GB/TB powers of 1000, as
    their names say; a bare number is bytes. Other spellings (``KB``,
    ``mb``) are refused rather than guessed, because people mean both 1000
    and 1024 by them. A fraction is rounded to whole bytes."""
    if len(text) > MAX_TEXT:
        raise _too_long(text, what)
    m = _AMOUNT_RE.fullmatch(text.strip())
    if m is None:
        raise ConfigError(f"{what} {text!r} is not a number with a unit like 512KiB or 1.5GB")
    unit = m["unit"]
    if unit not in _SIZE_UNITS:
        raise ConfigError(f"{what} {text!r} has unit {unit!r}: use {_SIZE_UNIT_LIST}")
    value = _number(m["number"]) * _SIZE_UNITS[unit]
    return check_size(value, minimum=minimum, maximum=maximum, what=what, shown=repr(text))


def check_size(
    size: int | Decimal,
    *,
    minimum: int = 0,
    maximum: int = MAX_SIZE,
    what: str = "size",
    shown: str | None = None,
) -> int:
    """Bound a size already in bytes (a number in ``rdsd.toml``); a
    fraction is rounded to whole bytes. ``shown`` is how the value appears
    in the message; the number itself by default."""
    label = shown if shown is not None else str(size)
    if size < 0:
        raise ConfigError(f"{what} {label} must not be negative")
    if size > maximum:
        raise ConfigError(f"{what} {label} is out of range: at most {format_size(maximum)}")
    whole = int(Decimal(size).to_integral_value())
    if whole < minimum:
        raise ConfigError(f"{what} {label} is out of range: at least {format_size(minimum)}")
    return whole


def format_rate(rate: float) -> str:
    """Bytes per second as ``parse_rate`` reads it back: ``unlimited`` for 0,
    else ``20MB/s``, ``512KiB/s`` or ``1234.5B/s``."""
    if rate == 0:
        return _UNLIMITED
    exact = _exact_decimal(rate)
    if exact == exact.to_integral_value():
        return format_size(int(exact)) + "/s"
    return f"{_plain(exact)}B/s"


def parse_rate(
    text: str,
    *,
    minimum: float = 1,
    maximum: float = MAX_RATE,
    what: str = "rate",
) -> float:
    """``20MB/s``, ``500KiB/s``, ``100Mbit/s`` to bytes per second.

    Byte units are those of ``parse_size``; bit units (``bit``, ``kbit``,
    ``Mbit``, ``Gbit``, powers of 1000 as network speeds are quoted) are
    divided by eight. A unit needs ``/s`` so a size is not mistaken for a
    rate; a bare number is bytes per second. ``0`` (in any unit) and
    ``unlimited`` mean no limit and give ``0.0``; any other rate must lie
    within ``minimum..maximum`` bytes per second."""
    if len(text) > MAX_TEXT:
        raise _too_long(text, what)
    stripped = text.strip()
    if stripped.lower() == _UNLIMITED:
        return 0.0
    m = _RATE_RE.fullmatch(stripped)
    if m is None:
        raise ConfigError(
            f"{what} {text!r} is not a rate like 20MB/s, 500KiB/s or 100Mbit/s (0 = unlimited)"
        )
    unit = m["unit"]
    if unit in _BITS:
        value = _number(m["number"]) * _BITS[unit] / 8
    elif unit in _SIZE_UNITS:
        value = _number(m["number"]) * _SIZE_UNITS[unit]
    else:
        raise ConfigError(f"{what} {text!r} has unit {unit!r}: use {_RATE_UNIT_LIST}")
    if unit and not m["per"]:
        raise ConfigError(f"{what} {text!r} needs '/s' after the unit (like {stripped}/s)")
    return check_rate(value, minimum=minimum, maximum=maximum, what=what, shown=repr(text))


def check_rate(
    rate: float | Decimal,
    *,
    minimum: float = 1,
    maximum: float = MAX_RATE,
    what: str = "rate",
    shown: str | None = None,
) -> float:
    """Bound a rate already in bytes per second (a number in ``rdsd.toml``):
    0 means unlimited, anything else must lie within ``minimum..maximum``.
    ``shown`` is how the value appears in the message."""
    label = shown if shown is not None else str(rate)
    if isinstance(rate, float) and not math.isfinite(rate):
        raise ConfigError(f"{what} {label} is not a finite number (0 means unlimited)")
    value = _exact_decimal(rate) if isinstance(rate, float) else Decimal(rate)
    if value < 0:
        raise ConfigError(f"{what} {label} must not be negative (0 means unlimited)")
    if value == 0:
        return 0.0
    if value < _exact_decimal(minimum):
        raise ConfigError(
            f"{what} {label} is out of range: at least {format_rate(minimum)} (0 = unlimited)"
        )
    if value > _exact_decimal(maximum):
        raise ConfigError(f"{what} {label} is out of range: at most {format_rate(maximum)}")
    return float(value)


# -- time windows ----------------------------------------------------------

MINUTES_PER_DAY = 24 * 60


def _clock(part: str, whole: str, what: str, *, end: bool) -> int:
    """One ``HH:MM`` of a window, in minutes after midnight."""
    m = _CLOCK_RE.fullmatch(part.strip())
    if m is None:
        raise ConfigError(f"{what} {whole!r} is not HH:MM-HH:MM (like 22:00-06:00)")
    hour, minute = int(m[1]), int(m[2])
    if minute > 59 or hour > 24 or (hour == 24 and (minute > 0 or not end)):
        allowed = "00:00 to 24:00" if end else "00:00 to 23:59"
        raise ConfigError(f"{what} {whole!r} has the clock {part.strip()!r}: use {allowed}")
    return hour * 60 + minute


def parse_window(text: str, *, what: str = "window") -> tuple[int, int]:
    """``HH:MM-HH:MM`` to (start, end) in minutes after midnight.

    The window includes its start minute and ends just before its end
    minute. An end before the start wraps past midnight (``22:00-06:00``
    is the night); ``24:00`` may end a window. Equal ends are refused:
    they could mean "never" or "all day", and a person should say which
    (``00:00-24:00`` is all day). Which clock (UTC or local) the minutes
    are read on is for whoever applies the window to decide."""
    if len(text) > MAX_TEXT:
        raise _too_long(text, what)
    start_text, sep, end_text = text.partition("-")
    if not sep:
        raise ConfigError(f"{what} {text!r} is not HH:MM-HH:MM (like 22:00-06:00)")
    start = _clock(start_text, text, what, end=False)
    end = _clock(end_text, text, what, end=True)
    if start == end:
        raise ConfigError(
            f"{what} {text!r} starts and ends at the same time: "
            "give a real span (00:00-24:00 is all day)"
        )
    return start, end


def format_window(window: tuple[int, int]) -> str:
    """(start, end) minutes back to ``HH:MM-HH:MM``."""
    start, end = window
    return f"{start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}"


def _inside(window: tuple[int, int], minute: int) -> bool:
    start, end = window
    if start < end:
        return start <= minute < end
    return minute >= start or minute < end


def in_windows(windows: Iterable[tuple[int, int]], minute_of_day: int) -> bool:
    """Is ``minute_of_day`` (0..1439) inside any of the windows? No windows
    at all means no restriction: always inside."""
    windows = list(windows)
    if not windows:
        return True
    minute = minute_of_day % MINUTES_PER_DAY
    return any(_inside(w, minute) for w in windows)


def next_window_start(windows: Iterable[tuple[int, int]], minute_of_day: int) -> int:
    """Minutes from ``minute_of_day`` until a window is open: 0 when one is
    open now (or there are no windows), else the wait until the nearest
    start, at most 1439. Taking the minute as an argument keeps this pure,
    so a scheduler can test it without a clock."""
    windows = list(windows)
    minute = minute_of_day % MINUTES_PER_DAY
    if in_windows(windows, minute):
        return 0
    return min((start - minute) % MINUTES_PER_DAY for start, _ in windows)


# -- names -----------------------------------------------------------------


def _check_name(text: str, what: str) -> str:
    if not is_safe_name(text):
        raise ConfigError(f"{what} {text!r} is not allowed: {_NAME_RULE}")
    return text


def check_node_name(text: str, what: str = "node name") -> str:
    """A node name: it becomes a certificate CN, a database key and part of
    paths, so only the protocol's safe characters."""
    return _check_name(text, what)


def check_group_name(text: str, what: str = "group name") -> str:
    """A group name (``group:NAME`` destinations): the same rule as nodes."""
    return _check_name(text, what)


def check_job_id(text: str, what: str = "job id") -> str:
    """A job id chosen by a person: the same rule as nodes."""
    return _check_name(text, what)


# -- package ids -----------------------------------------------------------


def check_package_name(text: str, what: str = "package name") -> str:
    """A package NAME: it may contain ``-`` (``my-app``), but never at either
    end or twice in a row, and no part between dashes may be only dots,
    so the id ``NAME-VERSION`` splits back at its last ``-`` alone."""
    if _NAME_CHARS_RE.fullmatch(text) is None:
        raise ConfigError(f"{what} {text!r} is not allowed: {_PACKAGE_NAME_RULE}")
    if text.startswith("-") or text.endswith("-"):
        raise ConfigError(f"{what} {text!r} starts or ends with '-': {_PACKAGE_NAME_RULE}")
    if "--" in text:
        raise ConfigError(f"{what} {text!r} has '--': {_PACKAGE_NAME_RULE}")
    if any(part.strip(".") == "" for part in text.split("-")):
        raise ConfigError(f"{what} {text!r} has a part that is only dots: {_PACKAGE_NAME_RULE}")
    return text


def check_version(text: str, what: str = "version") -> str:
    """A package VERSION: no ``-`` at all, so it is everything after the
    id's last ``-`` (``2.0``, ``1.4.2_rc1``; not ``1.0-beta``)."""
    if "-" in text:
        hint = text.replace("-", "_")
        like = f" (like {hint!r})" if _VERSION_RE.fullmatch(hint) else ""
        raise ConfigError(f"{what} {text!r} contains '-': {_VERSION_RULE}{like}")
    if _VERSION_RE.fullmatch(text) is None or text.strip(".") == "":
        raise ConfigError(f"{what} {text!r} is not allowed: {_VERSION_RULE}")
    return text


def package_id(name: str, version: str) -> str:
    """``NAME-VERSION``, after checking both, so no two (name, version)
    pairs share an id: ``(my-app-1, 2)`` is ``my-app-1-2`` and
    ``(my-app, 1-2)`` is refused for its ``-``."""
    pid = f"{check_package_name(name)}-{check_version(version)}"
    if not is_package_id(pid):  # pragma: no cover - the rules above imply it
        raise ConfigError(f"package id {pid!r} is not a valid NAME-VERSION")
    return pid


def split_package_id(pid: str, what: str = "package id") -> tuple[str, str]:
    """``NAME-VERSION`` back to (name, version), split at the last ``-``.
    Refuses an id that ``package_id`` could not have made."""
    name, sep, version = pid.rpartition("-")
    if not sep or not name or not version:
        raise ConfigError(f"{what} {pid!r} is not NAME-VERSION (like my-app-2.0)")
    try:
        check_package_name(name)
        check_version(version)
    except ConfigError as exc:
        raise ConfigError(f"{what} {pid!r} is not NAME-VERSION: {exc}") from None
    return name, version


# -- commands and addresses -------------------------------------------------


def check_install_command(text: str, what: str = "--install") -> tuple[str, ...]:
    """An install command as a person types it, split the way a POSIX shell
    would (quotes, backslashes) but never run through one: the result is
    the argv the installer executes."""
    if "\0" in text:
        raise ConfigError(f"{what}: a NUL byte is not allowed in {text!r}")
    try:
        argv = tuple(shlex.split(text))
    except ValueError as exc:
        reason = str(exc).lower()
        if "quotation" in reason:
            raise ConfigError(f"{what}: no closing quotation in {text!r}") from None
        if "escaped" in reason:
            raise ConfigError(f"{what}: nothing follows the last backslash in {text!r}") from None
        raise ConfigError(f"{what}: cannot split {text!r}: {exc}") from None
    if not argv:
        raise ConfigError(f"{what}: {text!r} has no command in it")
    return argv


def format_address(address: tuple[str, int]) -> str:
    """(host, port) back to ``HOST:PORT``, brackets around an IPv6 host."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(text: str, *, what: str = "address") -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` to (host, port); port 0..65535
    (0 lets the system pick one, for tests and embedders). The host is a
    name or an IPv4 address, or an IPv6 address in brackets, which are
    needed because the address itself holds colons."""
    if len(text) > 300:
        raise ConfigError(f"{what} {text[:24]!r}... is too long for HOST:PORT")
    usage = "use HOST:PORT or [IPv6]:PORT (like 0.0.0.0:7700)"
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ConfigError(f"{what} {text!r} has no port: {usage}")
    if _PORT_RE.fullmatch(port) is None or int(port) > 65535:
        raise ConfigError(f"{what} {text!r} has port {port!r}: use a number from 0 to 65535")
    if host.startswith("[") and host.endswith("]"):
        inner = host[1:-1]
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise ConfigError(f"{what} {text!r} has {host!r}, not an IPv6 address") from None
        return inner, int(port)
    if ":" in host:
        raise ConfigError(f"{what} {text!r}: put an IPv6 address in brackets, like [::1]:7700")
    if _HOST_RE.fullmatch(host) is None:
        raise ConfigError(f"{what} {text!r} has host {host!r}: {usage}")
    return host, int(port)
