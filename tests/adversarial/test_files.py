"""Private state: what rdsd writes is its owner's alone.

Everything here goes through the real command line and real daemons, as an
operator would: the homes are 0700, every file the daemon and the commands
write (keys, ``state.db`` and its WAL, packages and envelopes in the store,
install logs, the settings, the pid file, a bundle) is 0600, install
commands still run with the conventional umask 0o022, and a daemon started
on a home whose modes were loosened says so once.
"""

from __future__ import annotations

import asyncio
import stat
import subprocess
import time
from pathlib import Path

import pytest

from rdsd.config import NodeConfig
from tests.helpers import rdsd_cmd

from .daemons import REPO, configure, daemon

INSTALL = 'umask > "$RDSD_TEST_OUT/umask.txt"\necho installed-now\n'


def rdsd(*args: str) -> str:
    out = subprocess.run([*rdsd_cmd(), *args], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, (args, out.stdout, out.stderr)
    return out.stdout.strip()


def loose(root: Path) -> list[str]:
    """Everything under ``root`` that group or others may use, except the
    contents of extracted packages (their modes are the archive's; the
    directory they sit in is private)."""
    found = []
    for path in [root, *root.rglob("*")]:
        if "extract" in path.relative_to(root).parts[2:3] or path.is_symlink():
            continue
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o077:
            found.append(f"{path.relative_to(root.parent)} {mode:04o}")
    return found


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


async def test_homes_and_everything_written_are_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("RDSD_TEST_OUT", str(out))
    server, client = tmp_path / "hq", tmp_path / "ws"
    rdsd("init", "server", "--home", str(server), "--name", "hq", "--listen", "127.0.0.1:0")
    bundle = tmp_path / "ws.bundle"
    rdsd("enroll", "ws", "--role", "client", "--home", str(server), "--out", str(bundle))
    src = tmp_path / "src"
    src.mkdir()
    (src / "install.sh").write_text(INSTALL)
    pid = rdsd(
        "package", "add", str(src), "--name", "app", "--version", "1.0",
        "--install", "sh install.sh", "--home", str(server),
    )  # fmt: skip
    with daemon(configure(NodeConfig.load(server))) as hq:
        host, port = hq.address
        rdsd("init", "client", "--home", str(client), "--bundle", str(bundle),
             "--parent", f"{host}:{port}")  # fmt: skip
        with daemon(configure(NodeConfig.load(client))) as ws:
            job = rdsd("job", "create", "--type", "install", "--package", pid, "--to", "ws",
                       "--home", str(server))  # fmt: skip
            status = ("job", "status", job, "--home", str(server))
            deadline = time.monotonic() + 30
            while "installed" not in rdsd(*status):
                assert time.monotonic() < deadline, rdsd(*status)
                await asyncio.sleep(0.2)
            assert not ws.events("home.permissions_loose")
        assert not hq.events("home.permissions_loose")
    # What was written, and that it was all written privately.
    assert {"state.db", "rdsd.toml", "rdsd.pid", "tls/node.key", f"store/{pid}.env"} <= files(
        server
    )
    assert f"store/{pid}.pkg" in files(server)
    assert any(name.startswith("work/") for name in files(client)), files(client)
    assert loose(server) == [] and loose(client) == []
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o600
    assert stat.S_IMODE(server.stat().st_mode) == 0o700
    # The install command itself ran with the conventional umask.
    assert (out / "umask.txt").read_text().strip() == "0022"


async def test_loosened_home_is_reported_once_at_start(tmp_path: Path) -> None:
    server = tmp_path / "hq"
    rdsd("init", "server", "--home", str(server), "--name", "hq", "--listen", "127.0.0.1:0")
    cfg = configure(NodeConfig.load(server))
    server.chmod(0o755)
    (server / "state.db").chmod(0o644)
    with daemon(cfg) as hq:
        warned = hq.events("home.permissions_loose")
        assert len(warned) == 1, warned
        paths = warned[0]["paths"]
        assert f"{server} 0755" in paths and f"{server / 'state.db'} 0644" in paths
        assert warned[0]["count"] == 2
        assert warned[0]["fix"] == f"chmod -R go-rwx {server}"
    # The daemon warns; it does not change the operator's modes behind them.
    assert stat.S_IMODE(server.stat().st_mode) == 0o755
