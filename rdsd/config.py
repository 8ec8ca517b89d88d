"""Node configuration: an explicit, immutable object built from a home dir.

The daemon and embedders both start a node from a ``NodeConfig``; nothing is
read from globals or the environment. A home directory holds ``node.json``
(role, name, addresses) next to the TLS material and state, so the CLI only
needs ``--home``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from protocol import is_safe_name

from .domain import Role
from .errors import ConfigError
from .util.fsutil import atomic_write

CONFIG_FILE = "node.json"
DEFAULT_CHUNK = 1024 * 1024
DEFAULT_KEEP = 90 * 86400
_DURATION = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) to a tuple; port 0 is allowed."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"address {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def format_address(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def iso(ts: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC with a Z, as every JSON output shows."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_duration(text: str) -> int:
    """``90s``, ``15m``, ``12h``, ``30d`` to seconds."""
    m = _DURATION.fullmatch(text.strip())
    if m is None or int(m.group(1)) <= 0:
        raise ConfigError(f"duration {text!r} is not a positive number with s, m, h or d")
    return int(m.group(1)) * _UNITS[m.group(2)]


@dataclass(frozen=True)
class HomePaths:
    """Where everything lives inside a home directory, in one place."""

    home: Path

    @property
    def config(self) -> Path:
        return self.home / CONFIG_FILE

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
    idle_timeout: float = 60.0
    ping_interval: float = 15.0
    poll_interval: float = 0.25
    reconnect_min: float = 0.2
    reconnect_max: float = 30.0
    retry_limit: int = 5
    sweep_interval: float = 60.0
    progress_interval: float = 5.0

    @property
    def paths(self) -> HomePaths:
        return HomePaths(self.home)

    def __post_init__(self) -> None:
        if not is_safe_name(self.name):
            raise ConfigError(f"node name {self.name!r} must match [A-Za-z0-9._-]{{1,64}}")
        if self.role is not Role.SERVER and self.parent is None:
            raise ConfigError(f"a {self.role.value} needs a parent address")
        if self.role is not Role.CLIENT and self.listen is None:
            raise ConfigError(f"a {self.role.value} needs a listen address")

    def to_json(self) -> dict[str, Any]:
        return {
            "role": self.role.value,
            "name": self.name,
            "listen": format_address(self.listen) if self.listen else None,
            "parent": format_address(self.parent) if self.parent else None,
            "chunk_size": self.chunk_size,
            "install_timeout": self.install_timeout,
        }

    def save(self) -> None:
        data = json.dumps(self.to_json(), indent=2).encode() + b"\n"
        atomic_write(self.paths.config, data)

    @classmethod
    def load(cls, home: Path, **overrides: Any) -> NodeConfig:
        """Read ``HOME/node.json``; keyword overrides win (tests, embedders)."""
        path = HomePaths(home).config
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"{home} is not an rdsd home (no {CONFIG_FILE}); run rdsd init"
            ) from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        try:
            kwargs: dict[str, Any] = {
                "home": home,
                "role": Role(raw["role"]),
                "name": raw["name"],
                "listen": parse_address(raw["listen"]) if raw.get("listen") else None,
                "parent": parse_address(raw["parent"]) if raw.get("parent") else None,
            }
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"{path} is incomplete or invalid: {exc}") from None
        known = {f.name for f in dataclasses.fields(cls)}
        for key in ("chunk_size", "install_timeout"):
            if key in raw:
                kwargs[key] = raw[key]
        kwargs.update({k: v for k, v in overrides.items() if k in known})
        return cls(**kwargs)
