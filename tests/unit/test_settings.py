"""rdsd.toml: every setting in SCHEMA is read, written back and documented;
everything else in the file is refused with one line naming it."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest

from rdsd.config import NodeConfig
from rdsd.domain import Role
from rdsd.errors import ConfigError
from rdsd.settings import (
    FILE_NAME,
    SCHEMA,
    SECTIONS,
    check_combination,
    defaults,
    load_settings,
    reference_table,
    render,
)

#: For every setting: a value as written in the file, and what it loads as.
#: None of them is the default, so each proves its key is honoured.
SAMPLES: dict[str, tuple[str, Any]] = {
    "role": ('"relay"', Role.RELAY),
    "name": ('"relay-7"', "relay-7"),
    "listen": ('"[::]:7701"', ("::", 7701)),
    "parent": ('"server.example.net:7700"', ("server.example.net", 7700)),
    "chunk_size": ('"256KiB"', 256 * 1024),
    "lane_min": ('"64MiB"', 64 * 1024 * 1024),
    "retry_limit": ("9", 9),
    "progress_interval": ("2.5", 2.5),
    "download_rate": ('"20MB/s"', 20e6),
    "upload_rate": ('"100Mbit/s"', 12.5e6),
    "per_child_rate": ("500000", 500000.0),
    "transfer_windows": ('["22:00-06:00", "12:00-13:00"]', ((1320, 360), (720, 780))),
    "install_windows": ('["01:00-24:00"]', ((60, 1440),)),
    "handshake_timeout": ('"20s"', 20.0),
    "idle_timeout": ('"2m"', 120.0),
    "ping_interval": ("30", 30.0),
    "install_timeout": ('"1h"', 3600.0),
    "reconnect_min": ('"500ms"', 0.5),
    "reconnect_max": ('"5m"', 300.0),
    "poll_interval": ('"100ms"', 0.1),
    "sweep_interval": ('"10m"', 600.0),
    "max_handshakes": ("512", 512),
    "connections_per_node": ("2", 2),
    "fetches_per_session": ("8", 8),
    "log_level": ('"debug"', "debug"),
    "log_format": ('"json"', "json"),
    "loop_lag_period": ('"2s"', 2.0),
}
BY_NAME = {s.name: s for s in SCHEMA}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / FILE_NAME
    path.write_text(text)
    return path


def refused(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: ") or str(path.parent) in message
    return message


# -- the schema ------------------------------------------------------------


def test_schema_is_complete_and_unique() -> None:
    names = [s.name for s in SCHEMA]
    places = [(s.section, s.key) for s in SCHEMA]
    assert len(set(names)) == len(names)
    assert len(set(places)) == len(places)
    assert set(names) == set(SAMPLES), "every setting needs a sample above"
    assert [s.section for s in SCHEMA] == sorted(
        (s.section for s in SCHEMA), key=[name for name, _ in SECTIONS].index
    )
    for s in SCHEMA:
        assert s.doc and "\n" not in s.doc and len(f"# {s.doc}") <= 100, s.name
        assert s.default is not None or s.example is not None, s.name


def test_schema_covers_node_config() -> None:
    """Every tunable NodeConfig field is a setting, with the same default."""
    table = defaults()
    for f in dataclasses.fields(NodeConfig):
        if f.name in ("home", "extra"):
            continue
        assert f.name in table, f"NodeConfig.{f.name} has no setting"
        if f.default is not dataclasses.MISSING:
            assert table[f.name] == f.default, f.name


def test_defaults() -> None:
    table = defaults()
    assert table["role"] is None and table["name"] is None
    assert table["listen"] is None and table["parent"] is None
    assert table["chunk_size"] == 1024 * 1024
    assert table["log_level"] == "info" and table["log_format"] == "console"
    assert table["retry_limit"] == 5 and table["install_timeout"] == 600.0


# -- reading ---------------------------------------------------------------


@pytest.mark.parametrize("setting", SCHEMA, ids=lambda s: s.path)
def test_every_key_is_honoured(tmp_path: Path, setting: Any) -> None:
    literal, value = SAMPLES[setting.name]
    path = write(tmp_path, f"[{setting.section}]\n{setting.key} = {literal}\n")
    assert load_settings(path) == {setting.name: value}
    assert value != setting.default


def test_only_present_keys_are_returned(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "")) == {}
    assert load_settings(write(tmp_path, "[node]\n[log]\n")) == {}
    path = write(tmp_path, '[log]\nlevel = "warning"\n')
    assert load_settings(path) == {"log_level": "warning"}


@pytest.mark.parametrize(
    ("text", "name", "value"),
    [
        ("[timeouts]\nidle = 90", "idle_timeout", 90.0),
        ("[timeouts]\nidle = 1.5", "idle_timeout", 1.5),
        ('[timeouts]\nidle = "1.5h"', "idle_timeout", 5400.0),
        ("[transfer]\nchunk_size = 65536", "chunk_size", 65536),
        ('[transfer]\nchunk_size = "16MiB"', "chunk_size", 16 * 1024 * 1024),
        ('[node]\nrole = "server"', "role", Role.SERVER),
        ("node.name = 'dotted'", "name", "dotted"),
    ],
)
def test_value_spellings(tmp_path: Path, text: str, name: str, value: Any) -> None:
    assert load_settings(write(tmp_path, text + "\n")) == {name: value}


@pytest.mark.parametrize(
    ("text", "phrases"),
    [
        ("[network]\nport = 1\n", ["unknown section [network]", "sections are [node], [transfer]"]),
        (
            "[node]\nrole = 'relay'\nadress = 'x:1'\n",
            ["unknown key 'adress' in [node]", "allowed: role, name, listen, parent"],
        ),
        (
            "[timeouts]\nidle_timeout = 5\n",
            ["unknown key 'idle_timeout' in [timeouts]", "allowed: handshake, idle"],
        ),
        ("role = 'relay'\n", ["'role' is outside any section; put it under [node]"]),
        ("install = 5\n", ["'install' is outside any section", "[windows] or [timeouts]"]),
        ("[limits]\nupload_rate = '20MB'\n", ["limits.upload_rate '20MB' needs '/s'"]),
        ("[limits]\nupload_rate = -1\n", ["limits.upload_rate -1 must not be negative"]),
        ("[limits]\nrate = 1\n", ["unknown key 'rate' in [limits]", "per_child_rate"]),
        ("[limits]\nfetches_per_session = 0\n", ["limits.fetches_per_session 0 is out of range"]),
        ("[windows]\ninstall = '22:00-06:00'\n", ["windows.install must be an array"]),
        ("[windows]\ntransfer = ['22:00-22:00']\n", ["starts and ends at the same time"]),
        ("[windows]\ntransfer = ['25:00-06:00']\n", ["has the clock '25:00'"]),
        ("colour = 5\n", ["'colour' is outside any section; sections are [node]"]),
        ("[[node]]\nrole = 'relay'\n", ["[node] must be a table, not an array"]),
        # wrong types
        (
            "[transfer]\nchunk_size = true\n",
            ['transfer.chunk_size must be bytes, or a string like "1MiB"', "not a boolean"],
        ),
        ("[transfer]\nchunk_size = 1.5\n", ["transfer.chunk_size must be bytes", "not a float"]),
        ("[transfer]\nretry_limit = '5'\n", ["transfer.retry_limit must be a whole number"]),
        ("[timeouts]\nidle = [60]\n", ["timeouts.idle must be seconds", "not an array"]),
        ("[timeouts]\nidle = 10:00:00\n", ["timeouts.idle must be seconds", "not a date or time"]),
        ("[node]\nlisten = 7700\n", ['node.listen must be "HOST:PORT"', "not an integer"]),
        ("[node]\nrole = {a = 1}\n", ["node.role must be server, relay or client", "not a table"]),
        # bad values
        ("[timeouts]\nidle = '99999999d'\n", ["timeouts.idle '99999999d' is out of range"]),
        ("[timeouts]\nidle = 0\n", ["timeouts.idle 0 must be more than zero"]),
        ("[timeouts]\nidle = nan\n", ["timeouts.idle nan is not a finite number"]),
        ("[timeouts]\nidle = '90'\n", ["timeouts.idle '90' has no unit"]),
        ("[timeouts]\ninstall = '8d'\n", ["timeouts.install '8d' is out of range: at most 7d"]),
        (
            "[transfer]\nchunk_size = 1024\n",
            ["transfer.chunk_size 1024 is out of range: at least 4KiB"],
        ),
        ("[transfer]\nchunk_size = '1GiB'\n", ["at most 16MiB"]),
        ("[transfer]\nretry_limit = 0\n", ["transfer.retry_limit 0 is out of range: 1 to 100"]),
        ("[node]\nrole = 'master'\n", ["node.role 'master' is not allowed: use server, relay or"]),
        ("[node]\nname = '../x'\n", ["node.name '../x' is not allowed"]),
        ("[node]\nparent = 'server'\n", ["node.parent 'server' has no port"]),
        ("[log]\nlevel = 'verbose'\n", ["log.level 'verbose' is not allowed", "debug, info"]),
        ("[log]\nformat = 'xml'\n", ["log.format 'xml' is not allowed: use console or json"]),
        # syntax
        ("[node]\nrole = \n", ["not valid TOML", "line 2"]),
        ("[node]\nrole = 'a'\nrole = 'b'\n", ["not valid TOML", "line 3"]),
        ("[node\n", ["not valid TOML", "line 1"]),
    ],
)
def test_refused(tmp_path: Path, text: str, phrases: list[str]) -> None:
    message = refused(write(tmp_path, text))
    for phrase in phrases:
        assert phrase in message, message


def test_missing_unreadable_and_binary(tmp_path: Path) -> None:
    message = refused(tmp_path / FILE_NAME)
    assert message == f"{tmp_path} has no rdsd.toml; run rdsd init or write one"
    (tmp_path / "dir" / FILE_NAME).mkdir(parents=True)
    assert refused(tmp_path / "dir" / FILE_NAME).startswith("cannot read ")
    path = tmp_path / FILE_NAME
    path.write_bytes(b"[node]\nname = '\xff'\n")
    assert "not UTF-8 text" in refused(path)


# -- combinations ----------------------------------------------------------


def test_check_combination() -> None:
    check_combination(defaults())
    check_combination({})
    with pytest.raises(ConfigError, match=r"ping_interval 1m must be less than timeouts.idle 30s"):
        check_combination(defaults() | {"ping_interval": 60.0})
    with pytest.raises(ConfigError, match=r"reconnect.min 1m is more than reconnect.max 30s"):
        check_combination(defaults() | {"reconnect_min": 60.0})


# -- writing ---------------------------------------------------------------


def non_defaults() -> dict[str, Any]:
    return {name: value for name, (_, value) in SAMPLES.items()}


@pytest.mark.parametrize(
    "values",
    [
        defaults(),
        {},
        non_defaults(),
        defaults() | {"role": Role.CLIENT, "name": "c1", "parent": ("10.0.0.1", 7700)},
        defaults() | {"ping_interval": 0.30000000000000004, "progress_interval": 1234.5},
        defaults() | {"chunk_size": 1000 * 1000, "install_timeout": 5400.0},
    ],
    ids=["defaults", "empty", "non-defaults", "client", "odd-floats", "exact-units"],
)
def test_render_round_trip(tmp_path: Path, values: dict[str, Any]) -> None:
    text = render(values)
    loaded = load_settings(write(tmp_path, text))
    assert defaults() | loaded == defaults() | values
    # Only what differs from the default is active.
    assert set(loaded) == {
        name for name, value in values.items() if value is not None and value != defaults()[name]
    }


def test_render_documents_every_key() -> None:
    text = render(non_defaults())
    lines = text.splitlines()
    assert all(len(line) <= 100 for line in lines)
    for setting in SCHEMA:
        (at,) = [
            i
            for i, line in enumerate(lines)
            if line.startswith(f"{setting.key} = ") and _section_of(lines, i) == setting.section
        ]
        assert lines[at - 1] == f"# {setting.doc}"
    for section, doc in SECTIONS:
        at = lines.index(f"[{section}]")
        assert lines[at - 1] == f"# {doc}"


def test_render_defaults_are_commented_out() -> None:
    text = render(defaults())
    assert tomllib.loads(text) == {name: {} for name, _ in SECTIONS}
    assert '# chunk_size = "1MiB"' in text
    assert '# idle = "30s"' in text
    assert '# listen = "0.0.0.0:7700"' in text


def test_render_refuses_what_would_not_load() -> None:
    with pytest.raises(ValueError, match="not settings: colour"):
        render({"colour": "blue"})
    with pytest.raises(
        ConfigError, match=r"transfer\.chunk_size '10B' is out of range: at least 4KiB"
    ):
        render({"chunk_size": 10})


def test_reference_table() -> None:
    table = reference_table()
    for s in SCHEMA:
        assert f"| `[{s.section}] {s.key}` |" in table
    assert table.count("\n") == len(SCHEMA) + 2


def _section_of(lines: list[str], at: int) -> str:
    for line in reversed(lines[:at]):
        if line.startswith("[") and line.endswith("]"):
            return line[1:-1]
    raise AssertionError("no section")
