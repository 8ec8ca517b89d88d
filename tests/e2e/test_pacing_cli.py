"""Limits and windows through the command line, with a real daemon.

``rdsd reload`` checks ``rdsd.toml`` and signals the running daemon, which
takes the new limits (its log says so) and keeps running; a bad file is
refused with one line and changes nothing. ``rdsd nodes`` and ``rdsft
status`` show a node's limits; ``rdsd job create --rate --window`` records
a job's own, which ``rdsd job status`` shows.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_cli_e2e import COUNT_SCRIPT, Cli, one_line_error, setup_deployment


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    cli = setup_deployment(tmp_path_factory.mktemp("pacing"))
    try:
        yield cli
    finally:
        cli.stop_all()


def set_line(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def test_reload_takes_new_limits_without_a_restart(cli: Cli) -> None:
    conf = Path(cli.home("server")) / "rdsd.toml"
    set_line(conf, '# upload_rate = "unlimited"', 'upload_rate = "2MB/s"')
    proc = cli.start("server")
    shown = cli.rdsd("nodes", "--home", cli.home("server")).stdout.splitlines()[-1]
    assert shown == "limits of server: upload 2MB/s, per child unlimited"

    set_line(conf, 'upload_rate = "2MB/s"', 'upload_rate = "4MB/s"')
    out = cli.rdsd("reload", "--home", cli.home("server")).stdout
    assert out.startswith(f"told the daemon of server (pid {proc.pid}) to take: upload 4MB/s")
    cli.wait_until("the reload in the log", lambda: "node.reloaded" in cli.log("server"))
    assert "upload_rate=4000000.0" in cli.log("server")
    assert proc.poll() is None

    # A bad file is refused before the daemon hears of it.
    set_line(conf, 'upload_rate = "4MB/s"', 'upload_rate = "fast"')
    bad = cli.rdsd("reload", "--home", cli.home("server"), ok=False)
    assert bad.returncode == 2
    one_line_error(bad)
    assert "limits.upload_rate 'fast' is not a rate" in bad.stderr
    assert cli.log("server").count("node.reloaded") == 1
    set_line(conf, 'upload_rate = "fast"', 'upload_rate = "4MB/s"')

    # SIGHUP does the same as rdsd reload.
    set_line(conf, 'upload_rate = "4MB/s"', 'upload_rate = "3MB/s"')
    proc.send_signal(signal.SIGHUP)
    cli.wait_until("the SIGHUP reload", lambda: "upload_rate=3000000.0" in cli.log("server"))
    assert proc.poll() is None
    shown = cli.rdsd("nodes", "--home", cli.home("server")).stdout.splitlines()[-1]
    assert shown == "limits of server: upload 3MB/s, per child unlimited"
    assert cli.stop("server") == 0


def test_reload_without_a_daemon_says_so(cli: Cli) -> None:
    out = cli.rdsd("reload", "--home", cli.home("client3"), ok=False)
    assert out.returncode != 0
    one_line_error(out)
    assert "no daemon is running" in out.stderr


def test_job_rate_and_window_and_client_limits(cli: Cli) -> None:
    pid = cli.add_package("paced", COUNT_SCRIPT)
    made = cli.rdsd(
        "job", "create", "--type", "install", "--package", pid, "--to", "client3",
        "--rate", "20MB/s", "--window", "22:00-06:00", "--window", "12:00-13:00",
        "--home", cli.home("server"),
    )  # fmt: skip
    job = made.stdout.strip()
    text = cli.rdsd("job", "status", job, "--home", cli.home("server")).stdout
    assert "paced: 20MB/s on every hop; windows: 22:00-06:00, 12:00-13:00" in text
    status = cli.json("job", "status", job, "--home", cli.home("server"))
    assert status["rate"] == 20_000_000
    assert status["windows"] == ["22:00-06:00", "12:00-13:00"]

    for flag, value, phrase in (
        ("--window", "25:00-06:00", "--window '25:00-06:00' has the clock '25:00'"),
        ("--rate", "20MB", "--rate '20MB' needs '/s'"),
    ):
        bad = cli.rdsd(
            "job", "create", "--type", "install", "--package", pid, "--to", "client3",
            flag, value, "--home", cli.home("server"), ok=False,
        )  # fmt: skip
        assert bad.returncode == 2
        one_line_error(bad)
        assert phrase in bad.stderr

    conf = Path(cli.home("client3")) / "rdsd.toml"
    set_line(conf, "# install = []", 'install = ["01:00-05:00"]')
    set_line(conf, '# download_rate = "unlimited"', 'download_rate = "100Mbit/s"')
    status_text = cli.rdsft("status", "--home", cli.home("client3"), ok=False).stdout
    assert (
        "  limits:    download 12500kB/s; transfer windows any time; "
        "install windows 01:00-05:00" in status_text
    )
    doc = json.loads(cli.rdsft("status", "--home", cli.home("client3"), "--json", ok=False).stdout)
    assert doc["limits"]["install_windows"] == ["01:00-05:00"]
    assert doc["limits"]["download_rate"] == 12_500_000
