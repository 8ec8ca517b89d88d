"""NodeConfig from a home: rdsd.toml (every key honoured, unknown keys
refused), an older home's node.json, the order defaults < file < overrides,
and where the command line looks for a home."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rdsd.admin import init_server
from rdsd.config import SYSTEM_HOME, HomePaths, NodeConfig, default_home
from rdsd.domain import Role
from rdsd.errors import ConfigError
from rdsd.settings import SCHEMA, defaults, load_settings
from tests.unit.test_settings import SAMPLES

BASE = '[node]\nrole = "server"\nname = "hq"\nlisten = "127.0.0.1:7700"\n'


def write(home: Path, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "rdsd.toml").write_text(text)


@pytest.mark.parametrize("setting", SCHEMA, ids=lambda s: s.path)
def test_every_key_reaches_the_node_config(tmp_path: Path, setting: Any) -> None:
    """Each setting written in rdsd.toml is the value the node runs with."""
    literal, value = SAMPLES[setting.name]
    if setting.section == "node":
        fixed = {"role": '"relay"', "name": '"relay-7"', "listen": '"[::]:7701"'}
        fixed["parent"] = '"server.example.net:7700"'
        fixed[setting.key] = literal
        text = "[node]\n" + "".join(f"{k} = {v}\n" for k, v in fixed.items())
    else:
        text = f"{BASE}[{setting.section}]\n{setting.key} = {literal}\n"
        if setting.name == "ping_interval":  # 30 s pings need an idle timeout above them
            text += 'idle = "2m"\n'
    write(tmp_path, text)
    cfg = NodeConfig.load(tmp_path)
    assert getattr(cfg, setting.name) == value
    assert value != setting.default


def test_defaults_fill_what_the_file_leaves_out(tmp_path: Path) -> None:
    write(tmp_path, BASE)
    cfg = NodeConfig.load(tmp_path)
    for name, value in defaults().items():
        if name not in ("role", "name", "listen"):
            assert getattr(cfg, name) == value, name
    assert (cfg.role, cfg.name, cfg.listen) == (Role.SERVER, "hq", ("127.0.0.1", 7700))


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    write(tmp_path, BASE + '[log]\nlevel = "debug"\nformat = "json"\n')
    cfg = NodeConfig.load(tmp_path, log_level="error", listen=("127.0.0.1", 0))
    assert (cfg.log_level, cfg.log_format, cfg.listen) == ("error", "json", ("127.0.0.1", 0))


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        (BASE + "[node]\n", "not valid TOML"),
        (BASE + "colour = 1\n", "unknown key 'colour' in [node]"),
        (BASE + "[limits]\nupload_rate = 0.5\n", "limits.upload_rate 0.5 is out of range"),
        (BASE + "[windows]\ninstall = [6]\n", "windows.install must be an array"),
        (BASE + "[limits]\nspeed = 1\n", "unknown key 'speed' in [limits]"),
        (BASE + "[timeouts]\nidle = true\n", "timeouts.idle must be seconds"),
        (BASE + '[timeouts]\nidle = "5s"\n', "ping_interval 10s must be less than"),
        ('[node]\nname = "hq"\n', "node.role is not set"),
        ('[node]\nrole = "relay"\nname = "r"\nlisten = "0.0.0.0:1"\n', "needs a parent"),
    ],
)
def test_bad_files_are_refused_naming_the_key(tmp_path: Path, text: str, phrase: str) -> None:
    write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        NodeConfig.load(tmp_path)
    assert phrase in str(err.value) and "\n" not in str(err.value)


def test_no_home(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not an rdsd home"):
        NodeConfig.load(tmp_path)


def test_init_writes_a_commented_file_that_loads_back(tmp_path: Path) -> None:
    cfg = init_server(tmp_path / "hq", name="hq", listen=("127.0.0.1", 7700))
    text = HomePaths(cfg.home).config.read_text()
    assert text.startswith("# rdsd.toml")
    assert '# idle = "30s"' in text and 'name = "hq"' in text
    assert load_settings(HomePaths(cfg.home).config) == {
        "role": Role.SERVER,
        "name": "hq",
        "listen": ("127.0.0.1", 7700),
    }
    assert NodeConfig.load(cfg.home) == cfg
    assert not HomePaths(cfg.home).legacy_config.exists()


def test_save_writes_what_differs(tmp_path: Path) -> None:
    cfg = NodeConfig(
        home=tmp_path, role=Role.CLIENT, name="c1", parent=("hq", 7700), install_timeout=60.0
    )
    cfg.save()
    assert NodeConfig.load(tmp_path) == cfg
    assert 'install = "1m"' in (tmp_path / "rdsd.toml").read_text()


# -- homes made before rdsd.toml ---------------------------------------------------------


def legacy(home: Path, doc: dict[str, Any]) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "node.json").write_text(json.dumps(doc))


def test_node_json_is_still_read(tmp_path: Path) -> None:
    legacy(
        tmp_path,
        {
            "role": "relay",
            "name": "relay-a",
            "listen": "0.0.0.0:7700",
            "parent": "hq.example:7700",
            "chunk_size": 65536,
            "install_timeout": 120.0,
        },
    )
    cfg = NodeConfig.load(tmp_path, poll_interval=0.1)
    assert (cfg.role, cfg.name, cfg.chunk_size, cfg.install_timeout) == (
        Role.RELAY,
        "relay-a",
        65536,
        120.0,
    )
    assert cfg.parent == ("hq.example", 7700) and cfg.poll_interval == 0.1
    assert cfg.idle_timeout == defaults()["idle_timeout"]
    assert not (tmp_path / "rdsd.toml").exists()  # read, never rewritten behind one's back


def test_rdsd_toml_wins_over_node_json(tmp_path: Path) -> None:
    legacy(tmp_path, {"role": "server", "name": "old", "listen": "0.0.0.0:1"})
    write(tmp_path, BASE)
    assert NodeConfig.load(tmp_path).name == "hq"


def test_a_bad_node_json_is_refused(tmp_path: Path) -> None:
    legacy(tmp_path, {"role": "server", "name": "hq", "listen": "0.0.0.0:1", "colour": 1})
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        NodeConfig.load(tmp_path)
    legacy(tmp_path, {"role": "server", "name": "hq", "listen": "nowhere"})
    with pytest.raises(ConfigError, match=r"node\.json: node\.listen 'nowhere' has no port"):
        NodeConfig.load(tmp_path)


def test_init_refuses_a_home_with_node_json(tmp_path: Path) -> None:
    from rdsd.errors import AdminError

    legacy(tmp_path, {"role": "server", "name": "hq", "listen": "0.0.0.0:1"})
    with pytest.raises(AdminError, match="already an rdsd home"):
        init_server(tmp_path)


# -- the default home ---------------------------------------------------------------------


def test_default_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RDSD_HOME", str(tmp_path / "env-home"))
    assert default_home() == tmp_path / "env-home"
    monkeypatch.delenv("RDSD_HOME")
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert default_home() == SYSTEM_HOME == Path("/var/lib/rdsd")
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_home() == tmp_path / "xdg" / "rdsd"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "me"))
    assert default_home() == tmp_path / "me" / ".local" / "share" / "rdsd"


def test_every_setting_is_used_by_the_code() -> None:
    """A setting that nothing reads must not exist: each one is read as
    ``cfg.NAME`` somewhere outside the modules that define and load it."""
    root = Path(__file__).resolve().parents[2] / "rdsd"
    sources = "\n".join(
        p.read_text()
        for p in root.rglob("*.py")
        if p.relative_to(root).as_posix() not in ("config.py", "settings.py")
    )
    unused = [s.name for s in SCHEMA if f".{s.name}" not in sources]
    assert not unused, f"settings nothing reads: {unused}"


# -- the README documents every setting ------------------------------------------------------

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_settings_table_is_the_schema() -> None:
    from rdsd.settings import reference_table

    text = README.read_text()
    start = text.index("<!-- settings table:")
    start = text.index("\n", start) + 1
    end = text.index("<!-- end of settings table -->")
    assert text[start:end] == reference_table(), "paste rdsd.settings.reference_table() again"


def test_readme_example_is_what_init_writes() -> None:
    from rdsd.settings import render

    text = README.read_text()
    start = text.index("```toml\n") + len("```toml\n")
    end = text.index("```", start)
    example = text[start:end]
    values = {"role": Role.CLIENT, "name": "ws-001", "parent": ("relay-a.example", 7700)}
    assert example == render(values)


def test_iso_shows_times_beyond_year_9999() -> None:
    """A manifest signed before keep durations were bounded may expire in
    the year 275817; listings show the last second datetime can hold
    instead of failing as a whole."""
    from rdsd.config import iso

    assert iso(0) == "1970-01-01T00:00:00Z"
    assert iso(1_700_000_000 + 99999999 * 86400) == "9999-12-31T23:59:59Z"
    assert iso(None) is None


def reference_iso(ts: float) -> str:
    """What ``iso`` showed before it cached whole seconds: datetime's own
    rounding to microseconds, then the second."""
    from datetime import UTC, datetime

    try:
        dt = datetime.fromtimestamp(ts, UTC)
    except (OverflowError, ValueError, OSError):
        last = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
        dt = last if ts > 0 else datetime(1970, 1, 1, tzinfo=UTC)
    return dt.isoformat(timespec="seconds").replace("+00:00", "Z")


@pytest.mark.parametrize(
    "ts",
    [
        0,
        0.0,
        1.5,
        1_700_000_000,
        1_700_000_000.25,
        1_700_000_000.999999,  # stays in its second
        1_700_000_000.9999994,  # still rounds down at microseconds
        1_700_000_000.9999996,  # rounds up to the next second
        1_700_000_001 - 1e-9,
        253_402_300_799.0,
        253_402_300_799.9999,
        253_402_300_800.0,
        1e300,
        float("inf"),
        -0.5,
        -1.0,
        -1e300,
        True,
    ],
)
def test_iso_shows_each_time_as_datetime_rounds_it(ts: float) -> None:
    """The cached whole seconds change nothing: near a second's end, at the
    year 9999's end, past it, before 1970 and at odd values alike."""
    from rdsd.config import iso

    assert iso(ts) == reference_iso(ts)
    assert iso(ts) == reference_iso(ts)  # and again, from the cache


@given(st.floats(min_value=-1e12, max_value=3e11, allow_nan=False))
def test_iso_agrees_with_datetime_everywhere(ts: float) -> None:
    from rdsd.config import iso

    assert iso(ts) == reference_iso(ts)
