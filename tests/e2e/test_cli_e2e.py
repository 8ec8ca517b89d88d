"""End to end through the command line, every node in its own process.

``rdsd`` and ``rdsft`` run as ``python -m`` subprocesses exactly as an
operator would type them; daemons are ``rdsd run`` processes on free
loopback ports, stopped with SIGTERM. The tests check the DESIGN §5
contract: what each command prints, its exit status, and that errors are
one line on stderr without a traceback.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
RDSD = [sys.executable, "-m", "rdsd.cli"]
RDSFT = [sys.executable, "-m", "rdsd.cli.rdsft"]
CMD_TIMEOUT = 60

COUNT_SCRIPT = """#!/bin/sh
echo "$RDSD_JOB" >> "$RDSD_TEST_OUT/count-$RDSD_NODE-$RDSD_PACKAGE.txt"
"""

FAIL_SCRIPT = """#!/bin/sh
echo "no space for widgets" >&2
exit 3
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cli:
    """A deployment driven only through the CLI: homes, env and daemons."""

    root: Path
    env: dict[str, str]
    out: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def home(self, name: str) -> str:
        return str(self.root / name)

    def run(self, cmd: list[str], *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*cmd, *args],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=REPO,
            timeout=CMD_TIMEOUT,
        )
        if ok:
            assert proc.returncode == 0, (args, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def rdsd(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(RDSD, *args, ok=ok)

    def rdsft(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(RDSFT, *args, ok=ok)

    def json(self, *args: str) -> Any:
        return json.loads(self.rdsd(*args, "--json").stdout)

    def start(self, name: str) -> subprocess.Popen[bytes]:
        """``rdsd run`` for home ``name``; returns once it says it runs."""
        log = self.root / f"{name}.log"
        with log.open("wb") as f:
            proc = subprocess.Popen(
                [*RDSD, "run", "--home", self.home(name)],
                stdout=f,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=REPO,
            )
        self.procs[name] = proc
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if re.search(rf"^rdsd \w+ {re.escape(name)} (listening on|running)", text, re.M):
                return proc
            assert proc.poll() is None, f"rdsd run {name} exited {proc.returncode}:\n{text}"
            time.sleep(0.05)
        raise AssertionError(f"rdsd run {name} did not start:\n{log.read_text()}")

    def stop(self, name: str, timeout: float = 10) -> int:
        """SIGTERM a daemon; its exit status (it is killed if it hangs)."""
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            raise AssertionError(f"rdsd run {name} did not stop within {timeout}s") from None

    def stop_all(self) -> None:
        for name in list(self.procs):
            proc = self.procs.pop(name)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def add_package(self, name: str, script: str, version: str = "1.0") -> str:
        src = self.root / f"src-{name}-{version}"
        src.mkdir()
        (src / "install.sh").write_text(script)
        (src / "payload.bin").write_bytes(os.urandom(300_000))
        out = self.rdsd(
            "package",
            "add",
            str(src),
            "--name",
            name,
            "--version",
            version,
            "--install",
            "sh install.sh",
            "--home",
            self.home("server"),
        )
        return out.stdout.strip()

    def create_job(self, pid: str, to: str) -> str:
        out = self.rdsd(
            "job",
            "create",
            "--type",
            "install",
            "--package",
            pid,
            "--to",
            to,
            "--home",
            self.home("server"),
        )
        return out.stdout.strip()

    def wait_until(self, what: str, check: Any, timeout: float = 15) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")

    def relay_has(self, job: str) -> None:
        """Wait until the server has pushed ``job`` to the relay, so that the
        client's query is answered from what the relay already holds."""
        self.wait_until(
            f"job {job} on relay1",
            lambda: (
                job in {j["id"] for j in self.json("job", "list", "--home", self.home("relay1"))}
            ),
        )

    def state(self, job: str, node: str) -> str:
        status = self.json("job", "status", job, "--home", self.home("server"))
        return str(next(d["state"] for d in status["destinations"] if d["node"] == node))

    def runs(self, node: str, pid: str) -> list[str]:
        path = self.out / f"count-{node}-{pid.rsplit('-', 1)[0]}.txt"
        return path.read_text().split() if path.exists() else []


def setup_deployment(root: Path) -> Cli:
    """Server, relay1 under it, client1 under the relay (which has run its
    daemon once, so the server knows its route), client2 under the relay
    that never ran a daemon, client3 directly under the server."""
    root.mkdir(parents=True, exist_ok=True)
    out = root / "installed"
    out.mkdir()
    env = dict(os.environ)
    env["RDSD_TEST_OUT"] = str(out)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cli = Cli(root=root, env=env, out=out)
    sport, rport = free_port(), free_port()
    server = cli.home("server")
    init = cli.rdsd(
        "init", "server", "--home", server, "--name", "server", "--listen", f"127.0.0.1:{sport}"
    )
    assert "server" in init.stdout
    for name, role in (
        ("relay1", "relay"),
        ("client1", "client"),
        ("client2", "client"),
        ("client3", "client"),
    ):
        cli.rdsd(
            "enroll", name, "--role", role, "--home", server, "--out", str(root / f"{name}.bundle")
        )
    cli.rdsd(
        "init",
        "relay",
        "--home",
        cli.home("relay1"),
        "--bundle",
        str(root / "relay1.bundle"),
        "--parent",
        f"127.0.0.1:{sport}",
        "--listen",
        f"127.0.0.1:{rport}",
    )
    for name, port in (("client1", rport), ("client2", rport), ("client3", sport)):
        cli.rdsd(
            "init",
            "client",
            "--home",
            cli.home(name),
            "--bundle",
            str(root / f"{name}.bundle"),
            "--parent",
            f"127.0.0.1:{port}",
        )
    return cli


def routed(cli: Cli, node: str, via: str) -> bool:
    nodes = {n["name"]: n for n in cli.json("nodes", "--home", cli.home("server"))}
    return bool(nodes.get(node, {}).get("via") == via)


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    cli = setup_deployment(tmp_path_factory.mktemp("cli"))
    try:
        cli.start("server")
        cli.start("relay1")
        cli.start("client1")
        cli.wait_until("client1 routed via relay1", lambda: routed(cli, "client1", "relay1"))
        assert cli.stop("client1") == 0
        yield cli
    finally:
        cli.stop_all()


def one_line_error(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].strip(), proc.stderr


# -- the main flow ------------------------------------------------------------------------


def test_rdsft_installs_without_the_client_daemon(cli: Cli) -> None:
    pid = cli.add_package("hello", COUNT_SCRIPT)
    assert pid == "hello-1.0"
    listed = cli.json("package", "list", "--home", cli.home("server"))
    assert pid in {p["id"] for p in listed}

    job = cli.create_job(pid, "client1")
    assert re.fullmatch(r"[A-Za-z0-9._-]{1,64}", job), job
    assert cli.state(job, "client1") == "waiting"
    cli.relay_has(job)

    first = cli.rdsft("-a", "--home", cli.home("client1"))
    lines = first.stdout.strip().splitlines()
    assert len(lines) == 1, first.stdout
    assert job in lines[0] and "installed" in lines[0], first.stdout
    assert cli.runs("client1", pid) == [job]

    cli.wait_until("installed on the server", lambda: cli.state(job, "client1") == "installed")
    status = cli.json("job", "status", job, "--home", cli.home("server"))
    assert {"id", "type", "package", "destinations"} <= set(status)
    assert (status["id"], status["type"], status["package"]) == (job, "install", pid)
    assert len(status["destinations"]) == 1
    dest = status["destinations"][0]
    assert {"node", "state", "detail"} <= set(dest)
    assert (dest["node"], dest["state"]) == ("client1", "installed")
    assert isinstance(dest["detail"], str)

    second = cli.rdsft("-a", "--home", cli.home("client1"))
    assert len(second.stdout.strip().splitlines()) == 1, second.stdout
    assert "no pending" in second.stdout.lower(), second.stdout
    assert cli.runs("client1", pid) == [job]


def test_rdsft_directly_under_the_server(cli: Cli) -> None:
    pid = cli.add_package("direct", COUNT_SCRIPT)
    job = cli.create_job(pid, "client3")
    out = cli.rdsft("-a", "--home", cli.home("client3"))
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and job in lines[0] and "installed" in lines[0], out.stdout
    assert cli.runs("client3", pid) == [job]
    cli.wait_until("installed on the server", lambda: cli.state(job, "client3") == "installed")


def test_failing_install_makes_rdsft_fail(cli: Cli) -> None:
    pid = cli.add_package("broken", FAIL_SCRIPT)
    job = cli.create_job(pid, "client1")
    cli.relay_has(job)
    proc = cli.rdsft("-a", "--home", cli.home("client1"), ok=False)
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and job in lines[0] and "failed" in lines[0], proc.stdout
    assert "no space for widgets" in lines[0], proc.stdout
    cli.wait_until("failed on the server", lambda: cli.state(job, "client1") == "failed")
    status = cli.json("job", "status", job, "--home", cli.home("server"))
    assert "3" in status["destinations"][0]["detail"]


def test_rdsft_on_a_client_behind_a_relay_that_never_ran_its_daemon(cli: Cli) -> None:
    """The first thing client2 ever does is ``rdsft -a``: the relay has never
    seen it and the server knows no route to it, yet its job must be done."""
    pid = cli.add_package("fresh", COUNT_SCRIPT)
    job = cli.create_job(pid, "client2")
    first = cli.rdsft("-a", "--home", cli.home("client2"))
    lines = first.stdout.strip().splitlines()
    assert len(lines) == 1 and job in lines[0] and "installed" in lines[0], first.stdout
    assert cli.runs("client2", pid) == [job]
    cli.wait_until("installed on the server", lambda: cli.state(job, "client2") == "installed")


# -- listings and status ---------------------------------------------------------------------


def test_json_listings_parse(cli: Cli) -> None:
    jobs = cli.json("job", "list", "--home", cli.home("server"))
    assert isinstance(jobs, list)
    assert all({"id", "type", "package"} <= set(j) for j in jobs)
    nodes = {n["name"]: n for n in cli.json("nodes", "--home", cli.home("server"))}
    assert nodes["relay1"]["role"] == "relay"
    assert nodes["client1"]["role"] == "client"
    assert nodes["client1"]["via"] == "relay1"
    assert nodes["relay1"]["last_seen"]
    packages = cli.json("package", "list", "--home", cli.home("server"))
    assert isinstance(packages, list)


def test_rdsft_status_reports_no_daemon_and_reachable_parent(cli: Cli) -> None:
    doc = json.loads(cli.rdsft("status", "--home", cli.home("client1"), "--json").stdout)
    assert doc["daemon"]["running"] is False
    assert doc["parent"]["reachable"] is True
    assert doc["node"] == "client1"


def test_rdsft_stdout_carries_only_its_own_output(cli: Cli) -> None:
    """Logs go to stderr: stdout is the command's answer and nothing else."""
    nothing = cli.rdsft("-a", "--home", cli.home("client3"))
    assert len(nothing.stdout.strip().splitlines()) == 1, nothing.stdout
    status = cli.rdsft("status", "--home", cli.home("client3"), "--json")
    assert json.loads(status.stdout)["node"] == "client3", status.stdout


# -- user errors ------------------------------------------------------------------------------


def test_user_errors_are_one_line_without_traceback(cli: Cli) -> None:
    server = cli.home("server")

    def refused(args: str) -> None:
        one_line_error(cli.rdsd(*args.split(), "--home", server, ok=False))

    refused("job create --type install --package nosuch-1.0 --to client1")
    cli.add_package("twice", COUNT_SCRIPT)
    again = cli.root / "src-twice-again"
    again.mkdir()
    (again / "x.txt").write_text("different content, same name and version\n")
    refused(f"package add {again} --name twice --version 1.0")
    refused(f"package add {cli.root / 'src-twice-1.0'} --name twice --version 1.0")
    refused("job create --type install --package twice-1.0 --to ../x")
    refused("job create --type install --package twice-1.0 --to client1,a/b")
    refused("job status nosuchjob")
    # Nothing was created by the refused commands.
    jobs = cli.json("job", "list", "--home", server)
    assert not any(j["package"] in ("nosuch-1.0", "twice-1.0") for j in jobs)


# -- daemons stop cleanly ------------------------------------------------------------------------


def start_three_tier(root: Path) -> Cli:
    """Server, relay1 and client1 daemons up, client1 routed via relay1."""
    cli = setup_deployment(root)
    cli.start("server")
    cli.start("relay1")
    cli.start("client1")
    cli.wait_until("client1 routed via relay1", lambda: routed(cli, "client1", "relay1"))
    return cli


def test_daemons_stop_cleanly_on_sigterm(tmp_path: Path) -> None:
    cli = start_three_tier(tmp_path / "sig")
    try:
        # Parents first: each daemon must stop with children still attached,
        # and while its own uplink is trying to reconnect.
        for name in ("server", "relay1", "client1"):
            started = time.monotonic()
            assert cli.stop(name) == 0, cli.log(name)
            assert time.monotonic() - started < 10
        doc = json.loads(cli.rdsft("status", "--home", cli.home("client1"), "--json").stdout)
        assert doc["daemon"]["running"] is False
        assert doc["parent"]["reachable"] is False
    finally:
        cli.stop_all()


def test_shutdown_with_children_attached_logs_no_traceback(tmp_path: Path) -> None:
    cli = start_three_tier(tmp_path / "sig")
    try:
        assert cli.stop("server") == 0
        assert cli.stop("relay1") == 0
        assert cli.stop("client1") == 0
        for name in ("server", "relay1", "client1"):
            assert "Traceback" not in cli.log(name), cli.log(name)
    finally:
        cli.stop_all()


def test_demo_succeeds() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "demo.py")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert "demo succeeded" in proc.stdout


def test_a_job_command_wakes_the_daemon_at_once(tmp_path: Path) -> None:
    """``rdsd job create`` (and retry, cancel) tells the running daemon the
    job database changed (SIGUSR1), so a job goes out at once even when the
    daemon looks at its database only every 60 s."""
    cli = setup_deployment(tmp_path)
    server_toml = Path(cli.home("server")) / "rdsd.toml"
    slow = "[housekeeping]\npoll_interval = 60\n"
    server_toml.write_text(server_toml.read_text().replace("[housekeeping]\n", slow))
    pid = cli.add_package("quick", COUNT_SCRIPT)
    try:
        cli.start("server")
        # The server learns of client3 as it connects (no poll involved).
        cli.start("client3")
        cli.wait_until("client3 online", lambda: routed(cli, "client3", "server"))
        started = time.monotonic()
        job = cli.create_job(pid, "client3")
        cli.wait_until("installed", lambda: cli.state(job, "client3") == "installed", 20)
        took = time.monotonic() - started
    finally:
        cli.stop_all()
    assert took < 15, f"the job took {took:.1f}s: it waited for the poll"
    assert cli.runs("client3", pid) == [job]
