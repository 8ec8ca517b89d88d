"""Node configuration: an explicit, immutable object built from a home dir.

The daemon and embedders both start a node from a ``NodeConfig``; nothing is
read from globals or the environment (the one exception is where the
command line looks for a home when ``--home`` is not given:
``default_home``). A home directory holds ``rdsd.toml`` (see
``settings.py``: every setting, its default and its check) next to the TLS
material and state, so the CLI only needs ``--home``. Homes made before
``rdsd.toml`` existed hold ``node.json`` instead; it is still read, never
written.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .domain import Role
from .errors import ConfigError
from .settings import FILE_NAME, SCHEMA, check_combination, defaults, load_settings, render
from .util.fsutil import atomic_write
from .util.parse import check_node_name, format_address, parse_address, parse_duration

CONFIG_FILE = FILE_NAME
#: What homes made before ``rdsd.toml`` hold; read when there is no rdsd.toml.
LEGACY_CONFIG_FILE = "node.json"
DEFAULT_CHUNK = 1024 * 1024
DEFAULT_KEEP = 90 * 86400
#: Where the command line looks for a home when neither ``--home`` nor
#: ``$RDSD_HOME`` says: the system's for root, the user's own otherwise.
SYSTEM_HOME = Path("/var/lib/rdsd")
HOME_ENV = "RDSD_HOME"
_SETTINGS = {s.name: s for s in SCHEMA}


def default_home() -> Path:
    """``$RDSD_HOME``; else ``/var/lib/rdsd`` for root; else
    ``$XDG_DATA_HOME/rdsd`` (``~/.local/share/rdsd`` when that is unset), so
    a person trying rdsd out never needs root and root finds the system's."""
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return SYSTEM_HOME
    xdg = os.environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / "rdsd"


#: The last second ``iso`` can show; later times (an expiry computed from a
#: keep duration that earlier versions did not bound) are shown as this.
_LAST_SHOWN = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


def iso(ts: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC with a Z, as every JSON output shows.
    A time beyond the year 9999 is shown as its last second rather than
    failing the whole listing it appears in.

    Listings show thousands of times, many within the same few minutes:
    each whole second is formatted once (``_iso_second``). A time is shown
    as its whole second unless its fraction rounds up to the next one at
    microseconds, as ``datetime`` rounds; those few take the long way."""
    if ts is None:
        return None
    if 0 <= ts < _SHOWN_BELOW:
        whole = int(ts)
        if ts - whole < _ROUNDS_DOWN:
            return _iso_second(whole)
    return _iso(ts)


#: Up to where ``iso``'s fast path goes: the year 10000.
_SHOWN_BELOW = 253_402_300_800
#: A fraction below this stays in its second when rounded to microseconds.
_ROUNDS_DOWN = 0.999999


@functools.lru_cache(maxsize=8192)
def _iso_second(whole: int) -> str | None:
    return _iso(whole)


def _iso(ts: float) -> str:
    try:
        dt = datetime.fromtimestamp(ts, UTC)
    except (OverflowError, ValueError, OSError):
        dt = _LAST_SHOWN if ts > 0 else datetime.fromtimestamp(0, UTC)
    return dt.isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class HomePaths:
    """Where everything lives inside a home directory, in one place."""

    home: Path

    @property
    def config(self) -> Path:
        return self.home / CONFIG_FILE

    @property
    def legacy_config(self) -> Path:
        return self.home / LEGACY_CONFIG_FILE

    def is_home(self) -> bool:
        """Has ``rdsd init`` made this home (in this or an earlier version)?"""
        return self.config.exists() or self.legacy_config.exists()

    @property
    def tls(self) -> Path:
        return self.home / "tls"

    @property
    def ca_cert(self) -> Path:
        return self.tls / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.tls / "ca.key"

    @property
    def cert(self) -> Path:
        return self.tls / "node.pem"

    @property
    def key(self) -> Path:
        return self.tls / "node.key"

    @property
    def signing_key(self) -> Path:
        return self.tls / "signing.key"

    @property
    def signing_pub(self) -> Path:
        return self.tls / "signing.pub"

    @property
    def db(self) -> Path:
        return self.home / "state.db"

    @property
    def store(self) -> Path:
        return self.home / "store"

    @property
    def work(self) -> Path:
        return self.home / "work"

    @property
    def locks(self) -> Path:
        return self.home / "locks"

    @property
    def pidfile(self) -> Path:
        return self.home / "rdsd.pid"


@dataclass(frozen=True)
class NodeConfig:
    """Everything a node needs to run. Timeouts are in seconds."""

    home: Path
    role: Role
    name: str
    listen: tuple[str, int] | None = None
    parent: tuple[str, int] | None = None
    chunk_size: int = DEFAULT_CHUNK
    install_timeout: float = 600.0
    handshake_timeout: float = 10.0
    idle_timeout: float = 30.0
    ping_interval: float = 10.0
    poll_interval: float = 0.25
    reconnect_min: float = 0.2
    reconnect_max: float = 30.0
    retry_limit: int = 5
    sweep_interval: float = 60.0
    progress_interval: float = 5.0
    download_rate: float = 0.0
    upload_rate: float = 0.0
    per_child_rate: float = 0.0
    transfer_windows: tuple[tuple[int, int], ...] = ()
    install_windows: tuple[tuple[int, int], ...] = ()
    max_handshakes: int = 128
    connections_per_node: int = 4
    fetches_per_session: int = 2
    lane_min: int = 4 * 1024 * 1024

    log_level: str = "info"
    log_format: str = "console"
    loop_lag_period: float = 10.0

    @property
    def paths(self) -> HomePaths:
        return HomePaths(self.home)

    def __post_init__(self) -> None:
        check_node_name(self.name)
        if self.role is not Role.SERVER and self.parent is None:
            raise ConfigError(f"a {self.role.value} needs a parent address")
        if self.role is not Role.CLIENT and self.listen is None:
            raise ConfigError(f"a {self.role.value} needs a listen address")

    def settings(self) -> dict[str, Any]:
        """Every setting under its flat name, as ``rdsd.toml`` holds them."""
        return {name: getattr(self, name) for name in _SETTINGS}

    def save(self) -> None:
        """Write ``HOME/rdsd.toml``: the values that differ from the
        defaults as settings, every other setting commented out with its
        default, so the file documents itself."""
        atomic_write(self.paths.config, render(self.settings()).encode())

    @classmethod
    def load(cls, home: Path, **overrides: Any) -> NodeConfig:
        """Defaults, then ``HOME/rdsd.toml`` (or an older home's
        ``node.json``), then keyword ``overrides`` (tests, embedders, the
        command line); the merged values are checked together. An override
        that is not a setting is refused, as an unknown key in the file is."""
        paths = HomePaths(home)
        if paths.config.exists():
            from_file = load_settings(paths.config)
            source = paths.config
        elif paths.legacy_config.exists():
            from_file = _load_legacy(paths.legacy_config)
            source = paths.legacy_config
        else:
            raise ConfigError(f"{home} is not an rdsd home (no {CONFIG_FILE}); run rdsd init")
        unknown = sorted(set(overrides) - set(_SETTINGS))
        if unknown:
            raise ConfigError(f"not settings: {', '.join(unknown)}")
        values = defaults() | from_file | overrides
        for name in ("role", "name"):
            if values[name] is None:
                raise ConfigError(f"{source}: {_SETTINGS[name].path} is not set")
        check_combination(values)
        return cls(home=home, **values)


def _load_legacy(path: Path) -> dict[str, Any]:
    """The settings in an older home's ``node.json`` (flat names, the
    values ``rdsd.toml`` takes), checked the same way."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: not a JSON object")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        setting = _SETTINGS.get(key)
        if setting is None:
            raise ConfigError(f"{path}: unknown key {key!r}")
        if value is not None:
            try:
                values[key] = setting.parse(value)
            except ConfigError as exc:
                raise ConfigError(f"{path}: {exc}") from None
    return values


__all__ = [
    "CONFIG_FILE",
    "DEFAULT_CHUNK",
    "DEFAULT_KEEP",
    "HOME_ENV",
    "LEGACY_CONFIG_FILE",
    "SYSTEM_HOME",
    "HomePaths",
    "NodeConfig",
    "default_home",
    "format_address",
    "iso",
    "parse_address",
    "parse_duration",
]
