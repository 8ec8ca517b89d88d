"""One documented configuration file per node: ``HOME/rdsd.toml``.

Every setting a node has is one entry of ``SCHEMA``: where it lives in the
file (``[section] key``), the flat name the rest of rdsd knows it by, how its
value is checked, its default and one line saying what it does. Reading
(``load_settings``), the defaults (``defaults``), the file ``rdsd init``
writes (``render``) and the reference table in the README all come from
that one tuple, so a setting cannot be documented but ignored, or honoured
but undocumented.

The file is strict: an unknown section or key, a value of the wrong type or
out of range is refused with one line naming ``section.key`` and what is
allowed. A typo in a configuration file must never silently mean the
default.

Values are read with the parsers of ``rdsd.util.parse``: durations may be a
number of seconds or a string such as ``"90s"``, sizes a number of bytes or
``"1MiB"``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time
from pathlib import Path
from typing import Any

from protocol import MAX_PAYLOAD

from .domain import Role
from .errors import ConfigError
from .util.parse import (
    check_node_name,
    check_rate,
    check_seconds,
    check_size,
    format_address,
    format_duration,
    format_rate,
    format_size,
    format_window,
    parse_address,
    parse_duration,
    parse_rate,
    parse_size,
    parse_window,
)

__all__ = [
    "FILE_NAME",
    "SCHEMA",
    "SECTIONS",
    "Kind",
    "Setting",
    "check_combination",
    "defaults",
    "load_settings",
    "reference_table",
    "render",
]

FILE_NAME = "rdsd.toml"


# -- kinds of values -------------------------------------------------------


def _toml_type(value: object) -> str:
    """What a TOML value is, in TOML's words, for "must be X, not Y"."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime | date | time):
        return "a date or time"
    return type(value).__name__  # pragma: no cover - tomllib makes no other types


def _toml_string(text: str) -> str:
    """A TOML basic string: quotes and backslashes escaped, control
    characters as ``\\uXXXX`` (which TOML, unlike JSON, needs for DEL)."""
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch < " " or ch == "\x7f":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


class _WrongType(Exception):
    """A TOML value of a type the setting does not take; the loader turns
    it into a message naming the setting, what it takes and what it got."""


@dataclass(frozen=True, slots=True)
class Kind:
    """How one kind of value is read from TOML and written back.

    ``read`` takes the TOML value and the setting's ``section.key`` (for
    messages) and returns the parsed value; ``write`` turns a parsed value
    into the TOML text ``read`` accepts again. ``allowed`` says in words
    what the file may hold, for messages and the README."""

    name: str
    allowed: str
    read: Callable[[object, str], Any]
    write: Callable[[Any], str]


def _duration(minimum: float, maximum: float) -> Kind:
    def read(raw: object, what: str) -> float:
        if isinstance(raw, str):
            return parse_duration(raw, minimum=minimum, maximum=maximum, what=what)
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            return check_seconds(raw, minimum=minimum, maximum=maximum, what=what)
        raise _WrongType

    def write(value: float) -> str:
        return _toml_string(format_duration(value))

    span = f"{format_duration(minimum)} to {format_duration(maximum)}"
    return Kind("duration", f'seconds, or a string like "90s" ({span})', read, write)


def _size(minimum: int, maximum: int) -> Kind:
    def read(raw: object, what: str) -> int:
        if isinstance(raw, str):
            return parse_size(raw, minimum=minimum, maximum=maximum, what=what)
        if isinstance(raw, int) and not isinstance(raw, bool):
            return check_size(raw, minimum=minimum, maximum=maximum, what=what)
        raise _WrongType

    def write(value: int) -> str:
        return _toml_string(format_size(value))

    span = f"{format_size(minimum)} to {format_size(maximum)}"
    return Kind("size", f'bytes, or a string like "1MiB" ({span})', read, write)


def _integer(minimum: int, maximum: int) -> Kind:
    def read(raw: object, what: str) -> int:
        if not isinstance(raw, int) or isinstance(raw, bool):
            raise _WrongType
        if not minimum <= raw <= maximum:
            raise ConfigError(f"{what} {raw} is out of range: {minimum} to {maximum}")
        return raw

    return Kind("integer", f"a whole number from {minimum} to {maximum}", read, str)


def _choice(*choices: str) -> Kind:
    listed = ", ".join(choices[:-1]) + f" or {choices[-1]}"

    def read(raw: object, what: str) -> str:
        if not isinstance(raw, str):
            raise _WrongType
        if raw not in choices:
            raise ConfigError(f"{what} {raw!r} is not allowed: use {listed}")
        return raw

    return Kind("choice", listed, read, _toml_string)


def _role() -> Kind:
    choice = _choice(*(r.value for r in Role))

    def read(raw: object, what: str) -> Role:
        return Role(choice.read(raw, what))

    def write(value: Role) -> str:
        return _toml_string(Role(value).value)

    return Kind("role", choice.allowed, read, write)


def _name() -> Kind:
    def read(raw: object, what: str) -> str:
        if not isinstance(raw, str):
            raise _WrongType
        return check_node_name(raw, what=what)

    return Kind("name", "1 to 64 of A-Z a-z 0-9 . _ -, not only dots", read, _toml_string)


def _address() -> Kind:
    def read(raw: object, what: str) -> tuple[str, int]:
        if not isinstance(raw, str):
            raise _WrongType
        return parse_address(raw, what=what)

    def write(value: tuple[str, int]) -> str:
        return _toml_string(format_address(value))

    return Kind("address", '"HOST:PORT" or "[IPv6]:PORT"', read, write)


def _rate() -> Kind:
    def read(raw: object, what: str) -> float:
        if isinstance(raw, str):
            return parse_rate(raw, what=what)
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            return check_rate(raw, what=what)
        raise _WrongType

    def write(value: float) -> str:
        return _toml_string(format_rate(value))

    return Kind(
        "rate",
        'bytes per second, or a string like "20MB/s", "512KiB/s", "100Mbit/s" (0 = unlimited)',
        read,
        write,
    )


def _windows() -> Kind:
    def read(raw: object, what: str) -> tuple[tuple[int, int], ...]:
        if not isinstance(raw, list) or not all(isinstance(w, str) for w in raw):
            raise _WrongType
        return tuple(parse_window(w, what=what) for w in raw)

    def write(value: tuple[tuple[int, int], ...]) -> str:
        return "[" + ", ".join(_toml_string(format_window(w)) for w in value) + "]"

    return Kind(
        "windows",
        'an array of "HH:MM-HH:MM" in local time, like ["22:00-06:00"] ([] = any time)',
        read,
        write,
    )


# -- the schema ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting: ``[section] key`` in the file, ``name`` everywhere else.

    ``example`` is what the rendered file shows (commented out) for a
    setting whose default is "not set" (``None``)."""

    section: str
    key: str
    name: str
    kind: Kind
    default: Any
    doc: str
    example: Any = None

    @property
    def path(self) -> str:
        """``section.key``, as messages name the setting."""
        return f"{self.section}.{self.key}"

    def parse(self, raw: object) -> Any:
        """The value of this setting given as ``raw`` in the file."""
        try:
            return self.kind.read(raw, self.path)
        except _WrongType:
            raise ConfigError(
                f"{self.path} must be {self.kind.allowed}, not {_toml_type(raw)}"
            ) from None

    def literal(self, value: Any) -> str:
        """``value`` as TOML text that ``parse`` reads back to it."""
        return self.kind.write(value)


#: Each section's heading comment in the rendered file, in file order.
SECTIONS: tuple[tuple[str, str], ...] = (
    ("node", "Who this node is and where it connects."),
    ("transfer", "How packages move between nodes."),
    ("limits", "Bandwidth limits (reloaded on SIGHUP and rdsd reload); what one peer may hold."),
    ("windows", "When this node transfers and installs (local time); reloaded like [limits]."),
    ("timeouts", "How long to wait before giving up on a peer or a command."),
    ("reconnect", "Waiting between attempts to reach the parent: min, doubling up to max."),
    ("housekeeping", "Work a node does on its own, on a timer."),
    ("log", "What the daemon logs and how."),
)

_TICK = 0.01  # the shortest timer a setting takes: 10 ms
_DAY = 86400.0

SCHEMA: tuple[Setting, ...] = (
    Setting(
        "node",
        "role",
        "role",
        _role(),
        None,
        "What this node is: server, relay or client; it must match the node's certificate.",
        example=Role.CLIENT,
    ),
    Setting(
        "node",
        "name",
        "name",
        _name(),
        None,
        "This node's name, as in its certificate: up to 64 letters, digits, '.', '_', '-'.",
        example="node-1",
    ),
    Setting(
        "node",
        "listen",
        "listen",
        _address(),
        None,
        "Where children connect to this node (servers and relays).",
        example=("0.0.0.0", 7700),
    ),
    Setting(
        "node",
        "parent",
        "parent",
        _address(),
        None,
        "The parent this node connects to (relays and clients).",
        example=("server.example.net", 7700),
    ),
    Setting(
        "transfer",
        "chunk_size",
        "chunk_size",
        _size(4096, MAX_PAYLOAD),
        1024 * 1024,
        "Size of the separately verified chunks of packages made on this node.",
    ),
    Setting(
        "transfer",
        "lane_min",
        "lane_min",
        _size(0, 1 << 50),
        4 * 1024 * 1024,
        "Packages this large or larger are fetched on a lane, a connection of its own (0: never).",
    ),
    Setting(
        "transfer",
        "retry_limit",
        "retry_limit",
        _integer(1, 100),
        5,
        "Attempts at downloading a package before its destination is marked failed.",
    ),
    Setting(
        "transfer",
        "progress_interval",
        "progress_interval",
        _duration(0.1, 3600),
        5.0,
        "How often a download in progress is logged and reported upward.",
    ),
    Setting(
        "limits",
        "download_rate",
        "download_rate",
        _rate(),
        0.0,
        "Most package data per second this node takes from its parent, all fetches together.",
    ),
    Setting(
        "limits",
        "upload_rate",
        "upload_rate",
        _rate(),
        0.0,
        "Most package data per second a server or relay sends to all its children together.",
    ),
    Setting(
        "limits",
        "per_child_rate",
        "per_child_rate",
        _rate(),
        0.0,
        "Most package data per second a server or relay sends to any one child.",
    ),
    Setting(
        "limits",
        "handshakes",
        "max_handshakes",
        _integer(1, 65536),
        128,
        "Connections between accept and WELCOME at once (TCP, TLS, HELLO); the rest wait.",
    ),
    Setting(
        "limits",
        "connections_per_node",
        "connections_per_node",
        _integer(1, 1024),
        4,
        "Open connections one certificate may have here; more are refused with a reason.",
    ),
    Setting(
        "limits",
        "fetches_per_session",
        "fetches_per_session",
        _integer(1, 64),
        2,
        "Package fetches served at once on one connection; its further fetches wait their turn.",
    ),
    Setting(
        "windows",
        "transfer",
        "transfer_windows",
        _windows(),
        (),
        "Outside these windows nothing is fetched from the parent (the chunk in flight ends).",
    ),
    Setting(
        "windows",
        "install",
        "install_windows",
        _windows(),
        (),
        "Install commands run only inside these windows; packages may arrive any time.",
    ),
    Setting(
        "timeouts",
        "handshake",
        "handshake_timeout",
        _duration(0.1, 600),
        10.0,
        "Time a new connection has to finish TLS and the HELLO exchange.",
    ),
    Setting(
        "timeouts",
        "idle",
        "idle_timeout",
        _duration(1, _DAY),
        30.0,
        "A connection that has heard nothing for this long is closed (its node shows offline).",
    ),
    Setting(
        "timeouts",
        "ping_interval",
        "ping_interval",
        _duration(0.1, 3600),
        10.0,
        "How often a child pings its parent; keep it well below timeouts.idle.",
    ),
    Setting(
        "timeouts",
        "install",
        "install_timeout",
        _duration(1, 7 * _DAY),
        600.0,
        "Time an install command may run before it is stopped and counted as failed.",
    ),
    Setting(
        "reconnect",
        "min",
        "reconnect_min",
        _duration(_TICK, 3600),
        0.2,
        "First wait after a lost or refused connection to the parent.",
    ),
    Setting(
        "reconnect",
        "max",
        "reconnect_max",
        _duration(_TICK, _DAY),
        30.0,
        "Longest wait between attempts; at least reconnect.min.",
    ),
    Setting(
        "housekeeping",
        "poll_interval",
        "poll_interval",
        _duration(_TICK, 60),
        0.25,
        "How soon the daemon sees what was written to its database (rdsd job commands wake it).",
    ),
    Setting(
        "housekeeping",
        "sweep_interval",
        "sweep_interval",
        _duration(0.1, _DAY),
        60.0,
        "The longest the expiry timer sleeps; packages go at their expiry, by a timer.",
    ),
    Setting(
        "log",
        "level",
        "log_level",
        _choice("debug", "info", "warning", "error"),
        "info",
        "Least important messages written: debug, info, warning or error.",
    ),
    Setting(
        "log",
        "format",
        "log_format",
        _choice("console", "json"),
        "console",
        "console for people to read, json for log collectors (one object per line).",
    ),
    Setting(
        "log",
        "lag_period",
        "loop_lag_period",
        _duration(0.5, 3600),
        10.0,
        "Period of the event-loop lag figures (loop.lag), logged when busy or lagging.",
    ),
)

_BY_NAME: dict[str, Setting] = {s.name: s for s in SCHEMA}
_BY_SECTION: dict[str, dict[str, Setting]] = {
    section: {s.key: s for s in SCHEMA if s.section == section} for section, _ in SECTIONS
}


def defaults() -> dict[str, Any]:
    """Every setting's default under its flat name; ``None`` is "not set"."""
    return {s.name: s.default for s in SCHEMA}


# -- reading ---------------------------------------------------------------


def _listed(names: list[str]) -> str:
    return ", ".join(names)


def _parse_table(data: Mapping[str, Any]) -> dict[str, Any]:
    """The settings in a parsed TOML document, without the file name."""
    sections = _listed([f"[{name}]" for name, _ in SECTIONS])
    values: dict[str, Any] = {}
    for section, table in data.items():
        known = _BY_SECTION.get(section)
        if known is None:
            if not isinstance(table, dict):
                homes = " or ".join(f"[{s.section}]" for s in SCHEMA if s.key == section)
                where = f"; put it under {homes}" if homes else f"; sections are {sections}"
                raise ConfigError(f"{section!r} is outside any section{where}")
            raise ConfigError(f"unknown section [{section}]; sections are {sections}")
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}] must be a table, not {_toml_type(table)}")
        for key, raw in table.items():
            setting = known.get(key)
            if setting is None:
                raise ConfigError(
                    f"unknown key {key!r} in [{section}]; allowed: {_listed(list(known))}"
                )
            values[setting.name] = setting.parse(raw)
    return values


def load_settings(path: Path) -> dict[str, Any]:
    """The settings written in ``path``, under their flat names.

    Only keys present in the file are returned; the caller lays them over
    ``defaults()`` and under command-line options, so it alone knows where
    each value came from. Every problem is a ``ConfigError`` whose one line
    starts with the file's path."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path.parent} has no {path.name}; run rdsd init or write one") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return _parse_table(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def check_combination(values: Mapping[str, Any]) -> None:
    """Refuse settings that are each fine but wrong together.

    Run on the merged values (defaults, file, command line), since any of
    them may supply either half: pings at or beyond the idle timeout let a
    healthy idle connection be closed, and a backoff whose minimum exceeds
    its maximum is a typo."""
    ping, idle = values.get("ping_interval"), values.get("idle_timeout")
    if ping is not None and idle is not None and ping >= idle:
        raise ConfigError(
            f"timeouts.ping_interval {format_duration(ping)} must be less than "
            f"timeouts.idle {format_duration(idle)}, or idle connections are dropped"
        )
    low, high = values.get("reconnect_min"), values.get("reconnect_max")
    if low is not None and high is not None and low > high:
        raise ConfigError(
            f"reconnect.min {format_duration(low)} is more than "
            f"reconnect.max {format_duration(high)}"
        )


# -- writing ---------------------------------------------------------------

_HEADER = """\
# rdsd.toml: the settings of one rdsd node, read when the daemon starts.
#
# A setting that is commented out (# at the start of its line) keeps the
# default shown; remove the # and change the value to set it.
#   durations  seconds, or a string like "250ms", "90s", "15m", "12h", "30d"
#   sizes      bytes, or a string like "512KiB", "1MiB" (of 1024), "1.5GB" (of 1000)
#   rates      bytes per second, or a string like "20MB/s", "512KiB/s", "100Mbit/s"
#   windows    an array of "HH:MM-HH:MM" in local time; "22:00-06:00" spans midnight"""


def render(values: Mapping[str, Any]) -> str:
    """A complete, commented ``rdsd.toml`` for ``values`` (flat names).

    Every setting appears under its doc line. One whose value is given and
    differs from the default is written as an active line; the others are
    written commented out with their default (or, for one not set, an
    example), so the file documents itself and later changes to defaults
    still reach nodes that never chose otherwise. ``load_settings`` reads
    the result back to ``values`` laid over ``defaults()``."""
    unknown = sorted(set(values) - set(_BY_NAME))
    if unknown:
        raise ValueError(f"not settings: {', '.join(unknown)}")
    lines = [_HEADER]
    for section, doc in SECTIONS:
        lines += ["", f"# {doc}", f"[{section}]"]
        for setting in _BY_SECTION[section].values():
            lines += ["", f"# {setting.doc}"]
            value = values.get(setting.name)
            active = value is not None and (
                setting.default is None
                or setting.literal(value) != setting.literal(setting.default)
            )
            if active:
                literal = setting.literal(value)
                # Written values must load: check now, not when the daemon starts.
                setting.parse(tomllib.loads(f"v = {literal}")["v"])
                lines.append(f"{setting.key} = {literal}")
            else:
                shown = setting.default if setting.default is not None else setting.example
                lines.append(f"# {setting.key} = {setting.literal(shown)}")
    return "\n".join(lines) + "\n"


def reference_table() -> str:
    """The settings as a Markdown table, for the README."""
    rows = [
        "| Setting | Default | Allowed | Meaning |",
        "| --- | --- | --- | --- |",
    ]
    for s in SCHEMA:
        default = "not set" if s.default is None else f"`{s.literal(s.default)}`"
        allowed = s.kind.allowed.replace("|", "\\|")
        rows.append(f"| `[{s.section}] {s.key}` | {default} | {allowed} | {s.doc} |")
    return "\n".join(rows) + "\n"
