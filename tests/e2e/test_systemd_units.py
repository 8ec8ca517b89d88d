"""The systemd units in examples/systemd/: valid for systemd, and saying
what the operations guide promises.

``systemd-analyze verify`` checks a copy of each template under a concrete
instance name (``rdsd@hq.service``) whose ExecStart points at a stub
executable in the temporary directory, so that verify's check that the
command exists passes without rdsd installed in /usr/local/bin and every
other message it prints is a failure: no output is filtered. (A missing
``rdsd`` user is not reported by verify, so nothing else is changed.)

The rest parses the unit files and checks the properties that matter: one
instance per home, the user model, the sandbox, and a stop bound above the
install timeout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
UNITS = REPO / "examples" / "systemd"
HOME = "/var/lib/rdsd/%i"
INSTALL_TIMEOUT = 600.0  # NodeConfig.install_timeout's default
STOP_MARGIN = 30.0  # at least this much above the install timeout
VERIFY_TIMEOUT = 60

DAEMON_UNITS = ["rdsd@.service", "rdsd-client@.service"]
ALL_UNITS = [*DAEMON_UNITS, "rdsft-check@.service", "rdsft-check@.timer"]

Unit = dict[tuple[str, str], list[str]]


def parse_unit(path: Path) -> Unit:
    """Every assignment in order, per (section, key); comments dropped,
    continuation lines joined, an empty assignment kept (it resets a list)."""
    out: Unit = {}
    section = ""
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not an assignment: {line!r}"
        out.setdefault((section, key.strip()), []).append(value.strip())
    return out


def last(unit: Unit, key: str, section: str = "Service") -> str | None:
    values = unit.get((section, key))
    return values[-1] if values else None


def words(unit: Unit, key: str, section: str = "Service") -> set[str]:
    """A list setting's effective value: assignments add, an empty one resets."""
    acc: set[str] = set()
    for value in unit.get((section, key), []):
        if not value:
            acc.clear()
        acc.update(value.split())
    return acc


_SPAN_UNITS = {
    "us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3,
    "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
}  # fmt: skip


def timespan(text: str) -> float:
    """A systemd time span in seconds ("660", "11min", "1h 30min")."""
    if text == "infinity":
        return float("inf")
    total = 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text)
    assert parts and "".join(n + u for n, u in parts) == text.replace(" ", ""), text
    for number, unit in parts:
        total += float(number) * _SPAN_UNITS[unit or "s"]
    return total


@pytest.fixture(scope="module")
def units() -> dict[str, Unit]:
    return {name: parse_unit(UNITS / name) for name in ALL_UNITS}


# --- systemd-analyze verify ------------------------------------------------


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
    if not os.access(found, os.X_OK):
        pytest.skip("systemd-analyze is not installed (it comes with systemd)")
    return found


def _instance(template: str, instance: str, tmp: Path) -> Path:
    """Copy a template to ``tmp`` as ``NAME@INSTANCE.TYPE``, with the rdsd
    and rdsft programs replaced by stub executables in ``tmp/bin``."""
    bindir = tmp / "bin"
    bindir.mkdir(exist_ok=True)
    text = (UNITS / template).read_text()
    for prog in ("rdsd", "rdsft"):
        stub = bindir / prog
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
        text = text.replace(f"=/usr/local/bin/{prog} ", f"={stub} ")
    execs = re.findall(r"^Exec\w+=(\S+)", text, flags=re.M)
    assert all(e.startswith(str(bindir)) for e in execs), f"unexpected programs: {execs}"
    stem, suffix = template.split("@")
    path = tmp / f"{stem}@{instance}{suffix}"
    path.write_text(text)
    return path


def _verify(path: Path) -> str:
    result = subprocess.run(
        [_systemd_analyze(), "verify", "--man=no", str(path)],
        cwd=path.parent,
        capture_output=True,
        text=True,
        timeout=VERIFY_TIMEOUT,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": "cat"},
    )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, f"exit status {result.returncode}:\n{output}"
    return output


@pytest.mark.parametrize(
    ("template", "instance"),
    [
        ("rdsd@.service", "hq"),
        ("rdsd@.service", "relay-a"),
        ("rdsd-client@.service", "ws-001"),
        ("rdsft-check@.service", "ws-001"),
        ("rdsft-check@.timer", "ws-001"),
    ],
)
def test_systemd_analyze_verify_is_silent(template: str, instance: str, tmp_path: Path) -> None:
    _systemd_analyze()
    path = _instance(template, instance, tmp_path)
    if template.endswith(".timer"):  # verify the service it starts alongside
        _instance(template.replace(".timer", ".service"), instance, tmp_path)
    assert _verify(path) == ""


def test_verify_does_report_a_broken_copy(tmp_path: Path) -> None:
    """The silence above means something: verify does read the copy."""
    _systemd_analyze()
    path = _instance("rdsd@.service", "hq", tmp_path)
    path.write_text(path.read_text().replace("ProtectSystem=strict", "ProtectSystem=bogus"))
    assert "bogus" in _verify(path)


# --- what the files say ----------------------------------------------------


def test_only_the_templates_remain() -> None:
    for old in ("rdsd.service", "rdsft-check.service", "rdsft-check.timer"):
        assert not (UNITS / old).exists(), f"{old} is replaced by its template"
    for name in ALL_UNITS:
        assert (UNITS / name).is_file(), name


@pytest.mark.parametrize("name", ALL_UNITS)
def test_instance_name_is_the_home_directory(name: str, units: dict[str, Unit]) -> None:
    # %I would unescape "relay-a" into "relay/a".
    values = [v for vs in units[name].values() for v in vs]
    assert not [v for v in values if "%I" in v]
    if name.endswith(".service"):
        # Either file makes a home: rdsd.toml, or node.json from before it.
        asserts = units[name].get(("Unit", "AssertPathExists"), [])
        assert sorted(asserts) == [f"|{HOME}/node.json", f"|{HOME}/rdsd.toml"], asserts
        assert last(units[name], "StateDirectory") == "rdsd/%i"
        assert last(units[name], "StateDirectoryMode") == "0700"


@pytest.mark.parametrize("name", DAEMON_UNITS)
def test_daemon_runs_the_home_with_json_logs(name: str, units: dict[str, Unit]) -> None:
    unit = units[name]
    assert last(unit, "ExecStart") == f"/usr/local/bin/rdsd run --home {HOME} --log-format json"
    assert last(unit, "Restart") == "on-failure"
    assert timespan(last(unit, "RestartSec") or "0") >= 1
    assert "network-online.target" in words(unit, "Wants", "Unit")
    assert "network-online.target" in words(unit, "After", "Unit")
    assert last(unit, "WantedBy", "Install") == "multi-user.target"


@pytest.mark.parametrize("name", DAEMON_UNITS)
def test_stop_signals_the_daemon_and_waits_past_the_install_timeout(
    name: str, units: dict[str, Unit]
) -> None:
    unit = units[name]
    assert last(unit, "KillMode") == "mixed"
    assert last(unit, "KillSignal") in (None, "SIGTERM")
    stop = timespan(last(unit, "TimeoutStopSec") or "90s")
    assert stop >= INSTALL_TIMEOUT + STOP_MARGIN, f"TimeoutStopSec={stop}s"


def test_install_timeout_the_units_assume_is_the_default() -> None:
    import dataclasses

    from rdsd.config import NodeConfig

    default = {f.name: f.default for f in dataclasses.fields(NodeConfig)}["install_timeout"]
    assert default == INSTALL_TIMEOUT


def test_daemon_and_client_variants_exclude_each_other(units: dict[str, Unit]) -> None:
    assert "rdsd-client@%i.service" in words(units["rdsd@.service"], "Conflicts", "Unit")
    assert "rdsd@%i.service" in words(units["rdsd-client@.service"], "Conflicts", "Unit")


SERVER_SANDBOX = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "PrivateTmp": "yes",
    "ProtectHome": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "LockPersonality": "yes",
    "RestrictRealtime": "yes",
    "SystemCallArchitectures": "native",
    "UMask": "0077",
    "CapabilityBoundingSet": "",
}


def test_server_and_relay_unit_runs_sandboxed_as_rdsd(units: dict[str, Unit]) -> None:
    unit = units["rdsd@.service"]
    assert last(unit, "User") == "rdsd"
    assert last(unit, "Group") == "rdsd"
    assert last(unit, "DynamicUser") in (None, "no")
    wrong = {k: last(unit, k) for k, v in SERVER_SANDBOX.items() if last(unit, k) != v}
    assert not wrong, f"expected {SERVER_SANDBOX}"
    assert words(unit, "ReadWritePaths") == {HOME}
    assert words(unit, "RestrictAddressFamilies") == {"AF_INET", "AF_INET6", "AF_UNIX"}
    # A relay keeps a socket per child: far above the usual 1024.
    assert int(last(unit, "LimitNOFILE") or 0) >= 65536


def test_client_unit_can_change_the_system_and_keeps_the_rest(units: dict[str, Unit]) -> None:
    unit = units["rdsd-client@.service"]
    assert last(unit, "User") == "root"
    assert last(unit, "DynamicUser") in (None, "no")
    assert last(unit, "ProtectSystem") in (None, "no")
    assert last(unit, "ProtectHome") in (None, "no")
    assert not words(unit, "ReadWritePaths")
    assert not words(unit, "ReadOnlyPaths")
    assert not words(unit, "InaccessiblePaths")
    # Installed files must be readable by everyone; the home is 0700 anyway.
    assert last(unit, "UMask") == "0022"
    for key in ("PrivateTmp", "ProtectControlGroups", "LockPersonality", "RestrictRealtime"):
        assert last(unit, key) == "yes", key
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= words(unit, "RestrictAddressFamilies")


def test_check_service_runs_rdsft_for_the_instance(units: dict[str, Unit]) -> None:
    unit = units["rdsft-check@.service"]
    assert last(unit, "Type") == "oneshot"
    assert last(unit, "ExecStart") == f"/usr/local/bin/rdsft -a --home {HOME}"
    # It runs install commands, so it may change the system like the client.
    client = units["rdsd-client@.service"]
    for key in ("User", "UMask", "ProtectSystem", "ProtectHome", "NoNewPrivileges"):
        assert last(unit, key) == last(client, key), key
    assert words(unit, "RestrictAddressFamilies") == words(client, "RestrictAddressFamilies")
    assert timespan(last(unit, "TimeoutStartSec") or "infinity") > INSTALL_TIMEOUT


def test_check_timer_is_hourly_spread_and_persistent(units: dict[str, Unit]) -> None:
    timer = units["rdsft-check@.timer"]
    assert last(timer, "OnCalendar", "Timer") == "hourly"
    # Spread a relay's clients over the hour instead of the top of it.
    assert timespan(last(timer, "RandomizedDelaySec", "Timer") or "0") >= 30 * 60
    assert last(timer, "Persistent", "Timer") == "true"
    assert last(timer, "Unit", "Timer") in (None, "rdsft-check@%i.service")
    assert last(timer, "WantedBy", "Install") == "timers.target"
