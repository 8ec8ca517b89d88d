"""Refusals through the real command line, table-driven: each bad command
exits 2 (usage) or 1 (refused) with exactly one line on stderr, no
traceback, and changes nothing on disk or in the database. Then the
housekeeping commands, the default home, --version, a closed pipe, an
internal error, and what rdsft says to a revoked node and to a node of
another deployment.

The deployment is set up in process (faster than through the CLI, which
test_cli_e2e covers); only the commands under test run as subprocesses.
The Admin API's refusals are covered case by case, without processes, in
tests/unit/admin/test_validation.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import rdsd
from rdsd.admin import Admin, enroll, init_node, init_server
from rdsd.domain import Role
from tests.helpers import rdsd_cmd, rdsft_cmd, snapshot

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Site:
    root: Path
    env: dict[str, str]
    job: str  # an unfinished install job of tool-1.0 to client1
    old_job: str  # a job cancelled two hours ago
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def home(self, name: str) -> str:
        return str(self.root / name)

    def run(
        self, cmd: list[str], *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cmd, *args],
            capture_output=True,
            text=True,
            env=env or self.env,
            cwd=REPO,
            timeout=TIMEOUT,
        )

    def rdsd(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(rdsd_cmd(), *args)

    def rdsft(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(rdsft_cmd(), *args)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("refusals")
    port = free_port()
    server = root / "server"
    init_server(server, name="hq", listen=("127.0.0.1", port))
    bundles = root / "bundles"
    bundles.mkdir()
    for name, role in (
        ("relay1", Role.RELAY),
        ("client1", Role.CLIENT),
        ("client2", Role.CLIENT),
    ):
        enroll(server, name, role, bundles / f"{name}.bundle")
    init_node(root / "client2", Role.CLIENT, bundles / "client2.bundle", ("127.0.0.1", port))
    # A client of another deployment, pointed at this one's server.
    init_server(root / "other", name="other", listen=("127.0.0.1", 0))
    enroll(root / "other", "stranger", Role.CLIENT, bundles / "stranger.bundle")
    init_node(root / "stranger", Role.CLIENT, bundles / "stranger.bundle", ("127.0.0.1", port))
    src = root / "src"
    src.mkdir()
    (src / "install.sh").write_text("#!/bin/sh\necho ok\n")
    with Admin(server) as admin:
        admin.add_package(src, "tool", "1.0", "sh install.sh")
        admin.add_package(src, "spare", "1.0")
        job = admin.create_job("install", "tool-1.0", ["client1"])
        old_job = admin.create_job("install", "spare-1.0", ["client1"])
        admin.cancel(old_job)
        admin.revoke("client2")
    with sqlite3.connect(server / "state.db") as db:
        db.execute("UPDATE dests SET updated = updated - 7200 WHERE job=?", (old_job,))
    # The daemon reads its log settings from rdsd.toml.
    config = server / "rdsd.toml"
    config.write_text(
        config.read_text()
        .replace('# format = "console"', 'format = "json"')
        .replace('# level = "info"', 'level = "info"')
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["TMPDIR"] = str(root / "tmp")
    (root / "tmp").mkdir()
    env.pop("RDSD_HOME", None)
    site = Site(root=root, env=env, job=job, old_job=old_job)
    try:
        yield site
    finally:
        for proc in site.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


def one_line(proc: subprocess.CompletedProcess[str], status: int) -> str:
    assert proc.returncode == status, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), proc.stderr
    return lines[0]


# -- the refusals ----------------------------------------------------------------------------

USAGE, REFUSED = 2, 1

#: (id, arguments after ``rdsd``; ``{X}`` is a path under the site, status, phrases)
CASES: list[tuple[str, list[str], int, list[str]]] = [
    (
        "keep-99999999d",
        ["package", "add", "{src}", "--name", "big", "--version", "1", "--keep", "99999999d"],
        USAGE,
        ["--keep '99999999d' is out of range: at most 3650d (10 years)"],
    ),
    (
        "keep-without-unit",
        ["package", "add", "{src}", "--name", "big", "--version", "1", "--keep", "90"],
        USAGE,
        ["--keep '90' has no unit"],
    ),
    (
        "install-unclosed-quote",
        ["package", "add", "{src}", "--name", "q", "--version", "1", "--install", "sh -c 'echo"],
        USAGE,
        ["--install: no closing quotation"],
    ),
    (
        "version-with-dash",
        ["package", "add", "{src}", "--name", "my-app", "--version", "1-2"],
        USAGE,
        ["version '1-2' contains '-'"],
    ),
    (
        "install-to-a-relay",
        ["job", "create", "--type", "install", "--package", "tool-1.0", "--to", "relay1"],
        REFUSED,
        ["an install job goes to clients only; relay1 is a relay"],
    ),
    (
        "transfer-to-a-client",
        ["job", "create", "--type", "transfer", "--package", "tool-1.0", "--to", "client1"],
        REFUSED,
        ["a transfer job goes to relays only; client1 is a client"],
    ),
    (
        "at-in-the-past",
        [
            "job",
            "create",
            "--type",
            "install",
            "--package",
            "tool-1.0",
            "--to",
            "client1",
            "--at",
            "2020-01-01T00:00:00Z",
        ],
        USAGE,
        ["--at '2020-01-01T00:00:00Z' is in the past", "omit --at to run now"],
    ),
    (
        "unknown-group",
        ["job", "create", "--type", "install", "--package", "tool-1.0", "--to", "group:nosuch"],
        REFUSED,
        ["no group named nosuch"],
    ),
    (
        "group-with-unknown-node",
        ["group", "add", "g1", "client1", "ghost"],
        REFUSED,
        ["no node named ghost; enroll it first"],
    ),
    (
        "re-enroll-under-another-role",
        ["enroll", "client1", "--role", "relay", "--out", "{root}/new.bundle"],
        REFUSED,
        ["client1 is already enrolled as a client", "--force"],
    ),
    (
        "enroll-over-an-existing-bundle",
        ["enroll", "client9", "--role", "client", "--out", "{root}/bundles/client1.bundle"],
        REFUSED,
        ["already exists; add --force to overwrite it"],
    ),
    (
        "package-in-use",
        ["package", "remove", "tool-1.0"],
        REFUSED,
        ["package tool-1.0 is used by unfinished job {job}"],
    ),
    ("unknown-job", ["job", "status", "jnosuch"], REFUSED, ["no job jnosuch"]),
    ("prune-without-unit", ["job", "prune", "--older-than", "5"], USAGE, ["has no unit"]),
    ("unknown-command", ["frobnicate"], USAGE, ["invalid choice: 'frobnicate'", "--help"]),
    ("missing-option", ["job", "create", "--type", "install"], USAGE, ["required"]),
    (
        "init-client-with-listen",
        [
            "init",
            "client",
            "--home",
            "{root}/newhome",
            "--bundle",
            "{root}/bundles/x",
            "--parent",
            "127.0.0.1:1",
            "--listen",
            "127.0.0.1:2",
        ],
        USAGE,
        ["a client does not listen"],
    ),
]


@pytest.mark.parametrize(
    ("args", "status", "phrases"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_refused(site: Site, args: list[str], status: int, phrases: list[str]) -> None:
    fill = {"src": str(site.root / "src"), "root": str(site.root), "job": site.job}
    argv = [a.format(**fill) for a in args]
    if "--home" not in argv:
        argv += ["--home", site.home("server")]
    before = snapshot(site.root)
    line = one_line(site.rdsd(*argv), status)
    for phrase in phrases:
        assert phrase.format(**fill) in line, line
    assert snapshot(site.root) == before


# -- housekeeping through the CLI --------------------------------------------------------------


def test_housekeeping_commands(site: Site) -> None:
    home = ["--home", site.home("server")]
    out = site.rdsd("group", "add", "lab", "client1", "relay1", *home)
    assert out.returncode == 0 and out.stdout.strip() == "group lab: client1 relay1", out
    groups = json.loads(site.rdsd("group", "list", "--json", *home).stdout)
    assert groups == [{"name": "lab", "nodes": ["client1", "relay1"]}]
    out = site.rdsd("group", "remove", "lab", "relay1", *home)
    assert out.stdout.strip() == "group lab: removed relay1; left client1", out
    out = site.rdsd("group", "remove", "lab", *home)
    assert out.stdout.strip() == "removed group lab", out
    assert site.rdsd("group", "list", *home).stdout.strip() == "GROUP  NODES"

    create = ["job", "create", "--type", "offer", "--package", "tool-1.0", "--to", "client1"]
    first = site.rdsd(*create, "--request-id", "rollout-1", *home)
    second = site.rdsd(*create, "--request-id", "rollout-1", *home)
    assert first.returncode == second.returncode == 0, (first, second)
    assert first.stdout == second.stdout and re.fullmatch(r"j[0-9a-f]{16}\n", first.stdout)

    out = site.rdsd("job", "prune", "--older-than", "1h", *home)
    assert out.returncode == 0 and out.stdout.strip() == "pruned 1 finished job", out
    assert site.old_job not in site.rdsd("job", "list", *home).stdout
    assert site.rdsd("job", "prune", "--older-than", "1h", *home).stdout.strip() == (
        "pruned 0 finished jobs"
    )

    assert site.rdsd("package", "remove", "spare-1.0", *home).stdout.strip() == "removed spare-1.0"
    assert not (site.root / "server" / "store" / "spare-1.0.pkg").exists()


def test_home_from_the_environment(site: Site) -> None:
    env = site.env | {"RDSD_HOME": site.home("server")}
    out = site.run(rdsd_cmd(), "package", "list", "--json", env=env)
    assert out.returncode == 0, out
    assert "tool-1.0" in {p["id"] for p in json.loads(out.stdout)}


def test_version(site: Site) -> None:
    for cmd, prog in ((rdsd_cmd(), "rdsd"), (rdsft_cmd(), "rdsft")):
        out = site.run(cmd, "--version")
        assert out.returncode == 0 and out.stdout.strip() == f"{prog} {rdsd.__version__}", out


# -- the process edges ------------------------------------------------------------------------


def test_a_closed_pipe_is_silent(site: Site) -> None:
    """``rdsd job list | head -0``: the reader is gone before the first
    write; the command ends quietly, as a Unix filter does."""
    proc = subprocess.Popen(
        [*rdsd_cmd(), "job", "list", "--home", site.home("server")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=site.env,
        cwd=REPO,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(TIMEOUT) == 141
    assert err == b""


def test_an_internal_error_is_one_line_with_the_trace_file(site: Site) -> None:
    broken = site.root / "broken"
    shutil.copytree(site.root / "server", broken)
    for name in ("state.db-wal", "state.db-shm"):
        (broken / name).unlink(missing_ok=True)
    (broken / "state.db").write_bytes(b"this is not a database" * 100)
    line = one_line(site.rdsd("job", "list", "--home", str(broken)), 70)
    assert "internal error" in line
    match = re.search(r"the full trace is in (\S+)$", line)
    assert match, line
    trace = Path(match.group(1))
    assert trace.parent == site.root / "tmp"
    assert "Traceback" in trace.read_text()


# -- rdsft against a live server -----------------------------------------------------------------


@pytest.fixture(scope="module")
def server(site: Site) -> Path:
    """``rdsd run`` for the server, logging as its rdsd.toml says (JSON)."""
    log = site.root / "server.log"
    with log.open("wb") as f:
        proc = subprocess.Popen(
            [*rdsd_cmd(), "run", "--home", site.home("server")],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=site.env,
            cwd=REPO,
        )
    site.procs.append(proc)
    deadline = time.monotonic() + 20
    while "listening on" not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return log


def test_daemon_logs_as_rdsd_toml_says(site: Site, server: Path) -> None:
    deadline = time.monotonic() + 10
    while '"node.started"' not in server.read_text():
        assert time.monotonic() < deadline, server.read_text()
        time.sleep(0.05)
    events = [json.loads(line) for line in server.read_text().splitlines() if line.startswith("{")]
    assert any(e.get("event") == "node.started" and e.get("node") == "hq" for e in events)


def test_rdsft_on_a_revoked_node(site: Site, server: Path) -> None:
    line = one_line(site.rdsft("-a", "--home", site.home("client2")), REFUSED)
    assert line.startswith("rdsft: error: the parent at 127.0.0.1:"), line
    assert "refused client2: node client2 is revoked" in line


def test_rdsft_against_another_deployment(site: Site, server: Path) -> None:
    line = one_line(site.rdsft("-a", "--home", site.home("stranger")), REFUSED)
    assert "belongs to another deployment" in line and "SSL" not in line, line
