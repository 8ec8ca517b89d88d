"""Watching the work through the command line, every node its own process:
``rdsd job wait`` exit codes, presence in ``rdsd nodes``, job list filters,
daemons' JSON logs on a clean stop, a quiet ``rdsft -a``, and completion
scripts for bash and zsh."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_cli_e2e import (
    CMD_TIMEOUT,
    COUNT_SCRIPT,
    FAIL_SCRIPT,
    RDSD,
    REPO,
    Cli,
    setup_deployment,
)

WAIT_SCRIPT = """#!/bin/sh
sleep 30
"""


def start_json(cli: Cli, name: str) -> subprocess.Popen[bytes]:
    """``rdsd run --log-format json``: stdout and stderr kept apart, ready
    once it says ``daemon.ready`` on stdout."""
    out = (cli.root / f"{name}.stdout").open("wb")
    err = (cli.root / f"{name}.json").open("wb")
    proc = subprocess.Popen(
        [*RDSD, "run", "--home", cli.home(name), "--log-format", "json"],
        stdout=out,
        stderr=err,
        env=cli.env,
        cwd=REPO,
    )
    cli.procs[name] = proc
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if any(e.get("event") == "daemon.ready" for e in events(cli, name, "stdout")):
            return proc
        assert proc.poll() is None, f"{name} exited {proc.returncode}"
        time.sleep(0.05)
    raise AssertionError(f"{name} did not start: {(cli.root / f'{name}.json').read_text()}")


def events(cli: Cli, name: str, stream: str = "json") -> list[dict[str, Any]]:
    """Every line of the daemon's log (or stdout), each one JSON (or the
    test fails)."""
    text = (cli.root / f"{name}.{stream}").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def assert_clean(cli: Cli, name: str) -> None:
    """The daemon's whole log is JSON, ends with its one node.stopped, and
    has no warning or error; on stdout it said, in JSON, that it runs."""
    log = events(cli, name)
    bad = [e for e in log if e.get("level", e.get("log_level")) in ("warning", "error")]
    assert bad == [], (name, bad)
    assert [e["event"] for e in log].count("node.stopped") == 1, name
    assert log[-1]["event"] == "node.stopped", (name, log[-1])
    said = events(cli, name, "stdout")
    assert [e["event"] for e in said] == ["daemon.ready"], said
    assert said[0]["node"] == name and said[0]["level"] == "info"
    if said[0]["role"] != "client":
        host, port = said[0]["address"].rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        assert said[0]["message"].endswith(f"listening on {said[0]['address']}")


def nodes(cli: Cli) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in cli.json("nodes", "--home", cli.home("server"))}


@pytest.fixture(scope="module")
def wcli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    cli = setup_deployment(tmp_path_factory.mktemp("watching"))
    try:
        start_json(cli, "server")
        start_json(cli, "relay1")
        yield cli
    finally:
        cli.stop_all()


def wait(cli: Cli, job: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return cli.rdsd("job", "wait", job, "--home", cli.home("server"), *extra, ok=False)


def test_job_wait_succeeds_with_exit_0_and_one_line_per_change(wcli: Cli) -> None:
    pid = wcli.add_package("waitok", COUNT_SCRIPT)
    job = wcli.create_job(pid, "client3")
    start_json(wcli, "client3")
    try:
        proc = wait(wcli, job, "--timeout", "60")
    finally:
        assert wcli.stop("client3") == 0
    assert_clean(wcli, "client3")  # a client stopped under a live parent
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    lines = proc.stdout.strip().splitlines()
    assert "client3 installed" in lines, lines
    assert lines[-1].startswith(f"job {job}: succeeded"), lines
    assert proc.stderr == ""


def test_job_wait_exits_1_when_a_destination_fails(wcli: Cli) -> None:
    pid = wcli.add_package("waitfail", FAIL_SCRIPT)
    job = wcli.create_job(pid, "client3")
    start_json(wcli, "client3")
    try:
        proc = wait(wcli, job, "--timeout", "60")
    finally:
        assert wcli.stop("client3") == 0
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert any(line.startswith("client3 failed") for line in proc.stdout.splitlines())
    assert "failures" in proc.stdout.strip().splitlines()[-1]


def test_job_wait_exits_1_when_the_job_is_cancelled(wcli: Cli) -> None:
    pid = wcli.add_package("waitcancel", COUNT_SCRIPT)
    job = wcli.create_job(pid, "client3")  # client3's daemon is not running
    waiter = subprocess.Popen(
        [*RDSD, "job", "wait", job, "--timeout", "60", "--home", wcli.home("server")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=wcli.env,
        cwd=REPO,
    )
    try:
        time.sleep(0.5)
        assert waiter.poll() is None, waiter.communicate()
        wcli.rdsd("job", "cancel", job, "--home", wcli.home("server"))
        out, err = waiter.communicate(timeout=CMD_TIMEOUT)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait(5)
    assert waiter.returncode == 1, (out, err)
    assert "client3 cancelled" in out


def test_job_wait_times_out_with_exit_3(wcli: Cli) -> None:
    pid = wcli.add_package("waitslow", COUNT_SCRIPT)
    job = wcli.create_job(pid, "client3")  # nobody runs it
    began = time.monotonic()
    proc = wait(wcli, job, "--timeout", "1")
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert time.monotonic() - began < 15
    assert "not finished after 1s" in proc.stdout
    assert "client3 waiting" in proc.stdout
    # A bad timeout (a usage error, exit 2) or an unknown job (exit 1) is an
    # error, not a wait.
    bad = wait(wcli, job, "--timeout", "soon")
    assert bad.returncode == 2 and "--timeout" in bad.stderr, bad.stderr
    unknown = wait(wcli, "nosuchjob", "--timeout", "1")
    assert unknown.returncode == 1 and "no job" in unknown.stderr
    wcli.rdsd("job", "cancel", job, "--home", wcli.home("server"))


def test_job_list_filters_and_status_columns(wcli: Cli) -> None:
    home = wcli.home("server")
    everything = wcli.json("job", "list", "--home", home)
    assert len(everything) >= 4
    failed = wcli.json("job", "list", "--state", "failed", "--home", home)
    assert failed and all(j["states"].get("failed") for j in failed)
    done = wcli.json("job", "list", "--state", "done", "--since", "1h", "--home", home)
    assert done and all(j["done"] for j in done)
    newest = wcli.json("job", "list", "--limit", "1", "--home", home)
    assert [j["id"] for j in newest] == [everything[-1]["id"]]
    bad = wcli.rdsd("job", "list", "--since", "yesterday", "--home", home, ok=False)
    assert bad.returncode != 0 and "--since" in bad.stderr
    table = wcli.rdsd("job", "status", everything[0]["id"], "--home", home).stdout
    assert table.splitlines()[1].split()[:6] == ["NODE", "STATE", "BYTES", "RATE", "ETA", "DETAIL"]
    doc = wcli.json("job", "status", everything[0]["id"], "--home", home)
    assert {"bytes_done", "bytes_total", "rate", "eta"} <= set(doc["destinations"][0])


def test_presence_in_nodes_through_a_relay(wcli: Cli) -> None:
    """client1 runs behind relay1: online on the server, via relay1, with
    its version; offline again within 30 s of stopping."""
    start_json(wcli, "client1")
    try:
        wcli.wait_until("client1 online", lambda: nodes(wcli).get("client1", {}).get("online"))
        n = nodes(wcli)
        assert n["client1"]["via"] == "relay1"
        assert n["client1"]["version"].startswith("rdsd/")
        assert n["relay1"]["online"] and n["relay1"]["via"] == "server"
        table = wcli.rdsd("nodes", "--home", wcli.home("server")).stdout.splitlines()
        assert table[0].split()[:6] == ["NODE", "ROLE", "ONLINE", "VIA", "VERSION", "LAST"]
    finally:
        assert wcli.stop("client1") == 0
    wcli.wait_until("client1 offline", lambda: not nodes(wcli)["client1"]["online"], timeout=30)


def test_rdsft_a_that_succeeds_prints_no_warning(wcli: Cli) -> None:
    pid = wcli.add_package("quiet", COUNT_SCRIPT)
    job = wcli.create_job(pid, "client3")
    proc = wcli.rdsft("-a", "--home", wcli.home("client3"))
    assert job in proc.stdout and "installed" in proc.stdout
    assert proc.stderr == "", proc.stderr


def test_clean_stop_logs_one_stopped_event_and_nothing_worse(wcli: Cli) -> None:
    """Under --log-format json a daemon writes only JSON, nothing on stdout,
    and a SIGTERM gives one node.stopped and no warning or error: a relay
    with a child below and a parent above, then the server with a child."""
    start_json(wcli, "client1")
    start_json(wcli, "client3")
    wcli.wait_until(
        "client1 and client3 online",
        lambda: all(nodes(wcli).get(n, {}).get("online") for n in ("client1", "client3")),
    )
    for name in ("relay1", "server"):
        assert wcli.stop(name, timeout=20) == 0
        assert_clean(wcli, name)


@pytest.mark.parametrize("prog", ["rdsd", "rdsft"])
@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_scripts(tmp_path: Path, prog: str, shell: str) -> None:
    module = "rdsd.cli" if prog == "rdsd" else "rdsd.cli.rdsft"
    proc = subprocess.run(
        [RDSD[0], "-m", module, "completion", shell],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=CMD_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    if shell == "zsh":
        assert script.startswith(f"#compdef {prog}")
    else:
        assert f"-F _shtab_{prog} {prog}" in script
    if prog == "rdsd":
        for word in ("job", "wait", "nodes", "completion", "--home", "--state"):
            assert word in script, word
    path = tmp_path / f"{prog}.{shell}"
    path.write_text(script)
    checker = shutil.which(shell)
    if checker is None:
        pytest.skip(f"{shell} is not installed to check the syntax")
    check = subprocess.run([checker, "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
