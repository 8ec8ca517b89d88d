"""Exactly once, truthfully: an install survives the daemon's kill -9 and is
adopted, never run twice nor beside itself; jobs of one package on one node
share it; a full disk under the database is a failure the node recovers
from without a restart; expiry is exact; a crashing parent is not hammered.

Real daemons (``rdsd run`` subprocesses, killed with SIGKILL) where a test
kills one, nodes in this event loop where a test looks inside them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import sqlite3
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import structlog.testing

from protocol import NEED_DATA, Connection, Hello, Report, Side, Welcome
from rdsd.config import HomePaths, NodeConfig
from rdsd.domain import CLOCK_SKEW, JobType, Role
from rdsd.errors import ExpiredPackage
from rdsd.node import Node
from rdsd.node.install import RunRecord
from rdsd.security import server_context
from rdsd.state import Applied
from tests.faultproxy import DOWN, FaultProxy, delay, split
from tests.helpers import (
    FAST,
    Deployment,
    rdsft_cmd,
    running,
    wait_child,
    wait_state,
    wait_until,
)
from tests.integration.test_faults import (
    Daemon,
    KiB,
    MiB,
    add_package,
    cli,
    daemons,
    dest_of,
    job_db,
)

DONE = {"installed", "failed", "stored"}

#: An install with a side effect (a line in effects-NODE.txt) between two
#: sleeps, that notes each start and end and any overlap with another run
#: on the same node (mkdir is atomic).
EFFECT_SCRIPT = """#!/bin/sh
out="$RDSD_TEST_OUT"
echo "start $RDSD_JOB" >> "$out/events-$RDSD_NODE.txt"
mkdir "$out/running-$RDSD_NODE" 2>/dev/null || echo "$RDSD_JOB" >> "$out/overlap-$RDSD_NODE.txt"
sleep "${RDSD_TEST_BEFORE:-0}"
echo "$RDSD_JOB" >> "$out/effects-$RDSD_NODE.txt"
sleep "${RDSD_TEST_AFTER:-0}"
rmdir "$out/running-$RDSD_NODE"
echo "end $RDSD_JOB" >> "$out/events-$RDSD_NODE.txt"
exit "${RDSD_TEST_EXIT:-0}"
"""


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def no_process_runs(home: Path) -> bool:
    """No supervisor of this home's installs is alive."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = (proc / "cmdline").read_bytes()
            if b"supervise.py" in cmd and str(home).encode() in cmd:
                return False
    return True


# == 1. an install is an action with a durable record ===========================================


@pytest.mark.parametrize(
    ("phase", "exit_code"),
    [("before_effect", 0), ("after_effect", 0), ("ended_while_down", 0), ("ended_while_down", 3)],
)
async def test_kill9_during_install_is_adopted_with_its_real_result(
    deployment: Deployment, tmp_path: Path, phase: str, exit_code: int
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    pid = add_package(deployment, "effect", 64 * KiB, script=EFFECT_SCRIPT)
    async with running(deployment.server) as (server,):
        cfg = deployment.add_node("client1", Role.CLIENT, server.address)
        env = {
            "RDSD_TEST_OUT": str(out),
            "RDSD_TEST_BEFORE": "1.5",
            "RDSD_TEST_AFTER": "1.5",
            "RDSD_TEST_EXIT": str(exit_code),
        }
        client = Daemon(cfg.home, env=env)
        events, effects = out / "events-client1.txt", out / "effects-client1.txt"
        async with daemons(client):
            await client.start()
            await wait_child(server, "client1")
            with deployment.admin() as admin:
                job = admin.create_job("install", pid, ["client1"])
                if phase == "before_effect":
                    await wait_until(lambda: bool(lines(events)), 15, what="the install to start")
                else:
                    await wait_until(lambda: bool(lines(effects)), 15, what="its side effect")
                await client.kill(signal.SIGKILL)
                # The daemon is gone; the install is not (its supervisor runs it).
                assert not lines(effects) or phase != "before_effect"
                assert dest_of(admin, job, "client1")["state"] == "installing"
                record = RunRecord.load(cfg.paths.work, job)
                assert record is not None and record.pid is not None and record.start_time
                if phase == "ended_while_down":
                    await wait_until(
                        lambda: f"end {job}" in lines(events), 15, what="the install to end"
                    )
                await client.start()
                want = "installed" if exit_code == 0 else "failed"
                assert await wait_state(admin, job, "client1", DONE, 20) == want
                detail = dest_of(admin, job, "client1")["detail"]
                if exit_code:
                    assert f"exited with {exit_code}" in detail, detail
                assert "interrupted" not in detail
                await client.stop()
    # Exactly one run, one effect, no overlap, nothing left running or lying about.
    assert lines(events) == [f"start {job}", f"end {job}"]
    assert lines(effects) == [job]
    assert not (out / "overlap-client1.txt").exists()
    assert no_process_runs(cfg.home)
    work = HomePaths(cfg.home).work
    assert RunRecord.load(work, job) is None, "the record goes once the outcome is recorded"
    assert (work / f"{job}-{pid}.log").exists(), "the log stays"
    assert not (work / f"{job}-{pid}").exists(), "the extracted package goes after the install"
    print(f"\nkill -9 {phase}, exit {exit_code}: adopted, reported {want} ({detail!r})")


async def test_sigterm_stops_the_install_and_says_so(
    deployment: Deployment, tmp_path: Path
) -> None:
    """A clean stop does not leave the install running unseen: the supervisor
    kills it, the node reports ``failed: interrupted``, and a retry runs it
    once more, never beside the stopped run."""
    out = tmp_path / "out"
    out.mkdir()
    pid = add_package(deployment, "effect", 64 * KiB, script=EFFECT_SCRIPT)
    async with running(deployment.server) as (server,):
        cfg = deployment.add_node("client1", Role.CLIENT, server.address)
        client = Daemon(cfg.home, env={"RDSD_TEST_OUT": str(out), "RDSD_TEST_BEFORE": "2"})
        events, effects = out / "events-client1.txt", out / "effects-client1.txt"
        async with daemons(client):
            await client.start()
            await wait_child(server, "client1")
            with deployment.admin() as admin:
                job = admin.create_job("install", pid, ["client1"])
                # Started: its event logged and its marker made (the script
                # logs before it makes the marker, so wait for both).
                marker = out / "running-client1"
                await wait_until(
                    lambda: bool(lines(events)) and marker.exists(), 15, what="the install to start"
                )
                await client.stop()
                assert client.proc is not None and client.proc.returncode == 0
                assert no_process_runs(cfg.home), "the install stops with the node"
                with job_db(cfg.home) as db:
                    mine = db.dest(job, "client1")
                assert mine is not None and mine.state == "failed", mine
                assert mine.detail == "interrupted: the node stopped during the install"
                assert not lines(effects)
                # The killed command could not take its marker down; nothing runs now.
                marker.rmdir()
                await client.start()
                assert await wait_state(admin, job, "client1", {"failed"}, 10) == "failed"
                code, _, err = await cli("job", "retry", job, "--home", str(deployment.server.home))
                assert code == 0, err
                assert await wait_state(admin, job, "client1", {"installed"}, 20) == "installed"
                await client.stop()
    assert lines(effects) == [job]
    assert lines(events) == [f"start {job}", f"start {job}", f"end {job}"]
    assert not (out / "overlap-client1.txt").exists()


async def test_sigterm_while_adopting_stops_the_adopted_install(
    deployment: Deployment, tmp_path: Path
) -> None:
    """An install adopted after a kill -9 is stopped by a clean stop like any
    other, and the state says so."""
    out = tmp_path / "out"
    out.mkdir()
    pid = add_package(deployment, "effect", 64 * KiB, script=EFFECT_SCRIPT)
    async with running(deployment.server) as (server,):
        cfg = deployment.add_node("client1", Role.CLIENT, server.address)
        client = Daemon(cfg.home, env={"RDSD_TEST_OUT": str(out), "RDSD_TEST_BEFORE": "30"})
        events = out / "events-client1.txt"
        async with daemons(client):
            await client.start()
            await wait_child(server, "client1")
            with deployment.admin() as admin:
                job = admin.create_job("install", pid, ["client1"])
                await wait_until(lambda: bool(lines(events)), 15, what="the install to start")
                await client.kill(signal.SIGKILL)
                assert not no_process_runs(cfg.home), "the install outlives the daemon"
                await client.start()
                await asyncio.sleep(0.5)  # it adopts the running install and waits
                assert dest_of(admin, job, "client1")["state"] == "installing"
                await client.stop()
                assert no_process_runs(cfg.home), "the adopted install stops with the node"
                with job_db(cfg.home) as db:
                    mine = db.dest(job, "client1")
                assert mine is not None and mine.state == "failed", mine
                assert mine.detail == "interrupted: the node stopped during the install"
    assert lines(events) == [f"start {job}"]
    assert not lines(out / "effects-client1.txt")


async def rdsft_ok(home: Path, env: dict[str, str], *args: str) -> str:
    """Run ``rdsft ARGS --home HOME`` with ``env`` added; its output, once it
    has succeeded (within 30 s)."""
    proc = await asyncio.create_subprocess_exec(
        *rdsft_cmd(),
        *args,
        "--home",
        str(home),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
    )
    async with asyncio.timeout(30):
        stdout, stderr = await proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    return stdout.decode()


async def test_rdsft_adopts_an_install_a_killed_daemon_left_running(
    deployment: Deployment, tmp_path: Path
) -> None:
    """``rdsft -a`` runs installs with the same code and the same rules: after
    the daemon's kill -9 it waits for the install still running and reports
    its result; it does not run it a second time."""
    out = tmp_path / "out"
    out.mkdir()
    pid = add_package(deployment, "effect", 64 * KiB, script=EFFECT_SCRIPT)
    async with running(deployment.server) as (server,):
        cfg = deployment.add_node("client1", Role.CLIENT, server.address)
        env = {"RDSD_TEST_OUT": str(out), "RDSD_TEST_BEFORE": "2"}
        client = Daemon(cfg.home, env=env)
        events = out / "events-client1.txt"
        async with daemons(client):
            await client.start()
            await wait_child(server, "client1")
            with deployment.admin() as admin:
                job = admin.create_job("install", pid, ["client1"])
                await wait_until(lambda: bool(lines(events)), 15, what="the install to start")
                await client.kill(signal.SIGKILL)
                stdout = await rdsft_ok(cfg.home, env, "-a")
                assert f"{job} install {pid}: installed" in stdout
                assert dest_of(admin, job, "client1")["state"] == "installed"
    assert lines(events) == [f"start {job}", f"end {job}"]
    assert lines(out / "effects-client1.txt") == [job]


async def test_an_offer_installed_by_rdsft_waits_for_the_daemons_install_of_its_package(
    deployment: Deployment, tmp_path: Path
) -> None:
    """The daemon and ``rdsft install`` are two processes with a runner each:
    while the daemon runs one job's install of a package, ``rdsft install``
    of an offer of the same package waits for it, then runs; the two install
    commands never overlap."""
    out = tmp_path / "out"
    out.mkdir()
    pid = add_package(deployment, "effect", 64 * KiB, script=EFFECT_SCRIPT)
    async with running(deployment.server) as (server,):
        cfg = deployment.add_node("client1", Role.CLIENT, server.address)
        env = {"RDSD_TEST_OUT": str(out), "RDSD_TEST_BEFORE": "2"}
        client = Daemon(cfg.home, env=env)
        events = out / "events-client1.txt"
        async with daemons(client):
            await client.start()
            await wait_child(server, "client1")
            with deployment.admin() as admin:
                offer = admin.create_job("offer", pid, ["client1"])
                await wait_until(
                    lambda: dest_of(admin, offer, "client1")["state"] == "offered",
                    15,
                    what="the offer to arrive",
                )
                job = admin.create_job("install", pid, ["client1"])
                await wait_until(lambda: bool(lines(events)), 15, what="the install to start")
                stdout = await rdsft_ok(cfg.home, env, "install", pid)
                assert "installed" in stdout, stdout
                await wait_state(admin, job, "client1", {"installed"})
    assert lines(events) == [f"start {job}", f"end {job}", f"start {offer}", f"end {offer}"]
    assert not lines(out / "overlap-client1.txt")


async def test_a_background_failure_is_one_structured_event(deployment: Deployment) -> None:
    """What asyncio would print raw on stderr (an exception nobody retrieved,
    an SSL shutdown that timed out) is logged as one event of the node."""
    async with running(deployment.server):
        loop = asyncio.get_running_loop()
        with structlog.testing.capture_logs() as logs:
            loop.call_exception_handler(
                {
                    "message": "Task exception was never retrieved",
                    "exception": TimeoutError("SSL shutdown timed out"),
                }
            )
        events = [e for e in logs if e["event"] == "node.background_error"]
        assert len(events) == 1, logs
        assert "SSL shutdown timed out" in events[0]["error"]
        assert events[0]["message"] == "Task exception was never retrieved"
    assert loop.get_exception_handler() is None, "the loop is left as it was found"


# == 2. the store knows who uses a package ======================================================


async def test_staggered_jobs_of_one_package_all_install(
    deployment: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 jobs of one package, a few at a time, to 4 clients: each client
    fetches while it has none, runs the installs one at a time in order, and
    deletes the archive only when no job of it needs it any more."""
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("RDSD_TEST_OUT", str(out))
    monkeypatch.setenv("RDSD_TEST_BEFORE", "0.05")
    pid = add_package(deployment, "shared", 1 * MiB, script=EFFECT_SCRIPT)
    names = [f"client{i}" for i in range(1, 5)]
    async with running(deployment.server) as (server,):
        cfgs = [deployment.add_node(n, Role.CLIENT, server.address) for n in names]
        async with running(*cfgs) as clients:
            for n in names:
                await wait_child(server, n)
            with deployment.admin() as admin:
                jobs = []
                for i in range(20):
                    jobs.append(admin.create_job("install", pid, names))
                    await asyncio.sleep(0.03 + 0.04 * (i % 3))
                for job in jobs:
                    for n in names:
                        state = await wait_state(admin, job, n, DONE, 60)
                        assert state == "installed", (job, n, dest_of(admin, job, n))
            for node in clients:
                await wait_until(lambda node=node: not node.store.has(pid), 5, what="clean-up")  # type: ignore[misc]
    for n in names:
        assert sorted(lines(out / f"effects-{n}.txt")) == sorted(jobs), n
        assert not (out / f"overlap-{n}.txt").exists(), lines(out / f"overlap-{n}.txt")


# == 3. disk full under the database ============================================================


@contextlib.contextmanager
def small_filesystem(where: Path, size: str) -> Iterator[None]:
    """Put a tmpfs of ``size`` at ``where``, keeping what is there (root
    only; skipped otherwise)."""
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    moved = where.with_name(where.name + ".orig")
    where.mkdir(exist_ok=True)
    where.rename(moved)
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        where.rmdir()
        moved.rename(where)
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        shutil.copytree(moved, where, dirs_exist_ok=True, symlinks=True)
        yield
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(path: Path) -> None:
    """Write ``path`` until the filesystem under it has not a byte left."""
    with path.open("wb", buffering=0) as f:
        for size in (1024 * KiB, 64 * KiB, 4 * KiB, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * size)


@pytest.fixture
async def slow_server(deployment: Deployment) -> AsyncIterator[tuple[Node, FaultProxy]]:
    async with (
        running(deployment.server) as (server,),
        FaultProxy(server.address, default=[delay(0.01, DOWN), split(32 * KiB, DOWN)]) as proxy,
    ):
        yield server, proxy


async def test_database_disk_full_recovers_without_restart(
    deployment: Deployment,
    tmp_path: Path,
    slow_server: tuple[Node, FaultProxy],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The database's own filesystem fills while a package arrives: the store
    takes the package, the state cannot be recorded and is tried again; once
    there is room the install runs (once) and is reported, no restart."""
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("RDSD_TEST_OUT", str(out))
    pid = add_package(deployment, "big", 3 * MiB, script=EFFECT_SCRIPT)
    server, proxy = slow_server
    cfg = deployment.add_node("client1", Role.CLIENT, proxy.address)
    dbfs = tmp_path / "dbfs"
    with small_filesystem(dbfs, "4m"):
        # SQLite follows the link: the database and its log live on the small disk.
        for suffix in ("", "-wal", "-shm"):
            here = cfg.paths.db.with_name(cfg.paths.db.name + suffix)
            if here.exists():
                shutil.move(here, dbfs / here.name)
        cfg.paths.db.symlink_to(dbfs / cfg.paths.db.name)
        filler = dbfs / "filler"
        async with running(cfg) as (client,):
            await wait_child(server, "client1")
            with deployment.admin() as admin:
                job = admin.create_job("install", pid, ["client1"])
                await wait_until(lambda: client.store.active(pid) is not None, 15, what="fetch")
                # An empty write-ahead log, so the database's next write needs room.
                with contextlib.closing(sqlite3.connect(cfg.paths.db)) as db:
                    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                await asyncio.to_thread(fill, filler)
                await wait_until(lambda: client.store.has(pid), 30, what="the package stored")
                await asyncio.sleep(1.0)
                # Stored, but nothing more could be recorded: still transferring.
                assert client.db.dest(job, "client1").state == "transferring"  # type: ignore[union-attr]
                assert dest_of(admin, job, "client1")["state"] == "transferring"
                assert not lines(out / "effects-client1.txt")
                filler.unlink()
                state = await wait_state(admin, job, "client1", DONE, 30)
                assert state == "installed", dest_of(admin, job, "client1")
    assert lines(out / "effects-client1.txt") == [job]


async def test_full_store_disk_names_the_file_and_recovers(
    deployment: Deployment,
    tmp_path: Path,
    slow_server: tuple[Node, FaultProxy],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The whole home fills while a package arrives: its envelope cannot be
    written, the archive goes back out of the store (never an archive without
    its envelope), the failure names the file, and a retry installs."""
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("RDSD_TEST_OUT", str(out))
    pid = add_package(deployment, "big", 3 * MiB, script=EFFECT_SCRIPT)
    server, proxy = slow_server
    cfg = deployment.add_node("client1", Role.CLIENT, proxy.address)
    with small_filesystem(cfg.home, "24m"):
        filler = cfg.home / "filler"
        async with running(cfg) as (client,):
            await wait_child(server, "client1")
            with deployment.admin() as admin:
                job = admin.create_job("install", pid, ["client1"])
                # The archive's room is reserved as it starts; then the disk fills.
                await wait_until(lambda: client.store.active(pid) is not None, 15, what="fetch")
                await asyncio.to_thread(fill, filler)
                assert await wait_state(admin, job, "client1", DONE, 30) == "failed"
                detail = dest_of(admin, job, "client1")["detail"]
                assert f"{pid}.env" in detail and "No space left" in detail, detail
                assert not list(client.store.root.glob("*.pkg")), "no archive without envelope"
                assert not list(client.store.partial_dir.iterdir()), "nothing partial left"
                filler.unlink()
                assert admin.retry(job) == ["client1"]
                assert await wait_state(admin, job, "client1", DONE, 30) == "installed"
    assert lines(out / "effects-client1.txt") == [job]
    print(f"\nfull disk under the store: failed with {detail!r}, then a retry installed")


def _fetching(node: Node) -> set[str]:
    assert node.fetcher is not None
    return {p for p, t in node.fetcher._tasks.items() if not t.done()}


async def test_a_report_the_parent_cannot_record_keeps_the_session(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parent's database refuses a child's reports for a while (a full
    disk): the child's session is not dropped, the reports are not
    acknowledged, and they go again on the same session until they land."""
    with deployment.admin() as admin:
        src = deployment.root / "src-quiet"
        src.mkdir()
        (src / "payload.bin").write_bytes(os.urandom(10 * KiB))
        pid = admin.add_package(src, "quiet", "1.0")
    async with running(deployment.server) as (server,):
        cfg = replace(
            deployment.add_node("client1", Role.CLIENT, server.address),
            idle_timeout=1.5,
            ping_interval=0.5,
        )
        refused: list[list[str]] = []  # each refused commit: the reports in it
        real = server.db.apply_reports

        def full_disk(reps: Sequence[Report], forward: bool) -> list[Applied]:
            if len(refused) < 3:
                refused.append([r.report_id for r in reps])
                raise sqlite3.OperationalError("database or disk is full")
            return real(reps, forward)

        monkeypatch.setattr(server.db, "apply_reports", full_disk)
        async with running(cfg) as (client,):
            await wait_child(server, "client1")
            assert server.downlinks is not None and client.uplink is not None
            theirs, mine = server.downlinks.children["client1"].session, client.uplink.session
            with deployment.admin() as admin:
                job = admin.create_job("install", pid, ["client1"])
                assert await wait_state(admin, job, "client1", DONE, 20) == "installed"
            await wait_until(lambda: not client.db.outbox(), 10, what="every report acknowledged")
            assert server.downlinks.children["client1"].session is theirs and not theirs.closed
            assert client.uplink.session is mine
    assert len(refused) == 3


# == 4. expiry is exact =========================================================================


@contextlib.asynccontextmanager
async def relay_holding(
    deployment: Deployment, keep: int
) -> AsyncIterator[tuple[Node, Node, NodeConfig, str]]:
    with deployment.admin() as admin:
        src = deployment.root / "src-short"
        src.mkdir()
        (src / "payload.bin").write_bytes(os.urandom(200 * KiB))
        pid = admin.add_package(src, "short", "1.0", keep=keep)
    async with running(deployment.server) as (server,):
        rcfg = deployment.add_node("relay1", Role.RELAY, server.address)
        async with running(rcfg) as (relay,):
            await wait_child(server, "relay1")
            with deployment.admin() as admin:
                job = admin.create_job("transfer", pid, ["relay1"])
                assert await wait_state(admin, job, "relay1", DONE, 10) == "stored"
            ccfg = deployment.add_node("client1", Role.CLIENT, relay.address)
            yield server, relay, ccfg, pid


async def test_package_is_refused_one_second_after_expiry(deployment: Deployment) -> None:
    async with relay_holding(deployment, keep=3) as (_, relay, ccfg, pid):
        m = relay.store.manifest(pid)
        assert m is not None
        # Something still uses it, so the expiry timer must spare it: the
        # check at serving time is what refuses it.
        with relay.store.lease(pid, "a job"), deployment.admin() as admin:
            # Created while the package is fresh (a job for an expired package
            # is refused); the client comes only after the expiry.
            job = admin.create_job("install", pid, ["client1"])
            await asyncio.sleep(max(0.0, m.expires + 1 - time.time()))
            assert relay.store.has(pid)
            with pytest.raises(ExpiredPackage):
                async for _ in relay.store.chunks(pid, 0):
                    pass
            async with running(ccfg) as (_client,):
                assert await wait_state(admin, job, "client1", DONE, 15) == "failed"
                detail = dest_of(admin, job, "client1")["detail"]
                assert "expired" in detail, detail
        # Free again: the timer deletes it at once.
        await wait_until(lambda: not relay.store.has(pid), 2, what="the expired package to go")


async def test_relay_evicts_within_moments_of_expiry(deployment: Deployment) -> None:
    """No fixed sweep: a timer set from the earliest expiry in the store."""
    async with relay_holding(deployment, keep=3) as (_, relay, _ccfg, pid):
        assert relay.cfg.sweep_interval == 60.0
        m = relay.store.manifest(pid)
        assert m is not None
        await wait_until(lambda: not relay.store.has(pid), m.expires - time.time() + 2, 0.01)
        late = time.time() - m.expires
    print(f"\nrelay evicted the package {late:.2f}s after its expiry")
    assert 0 <= late < 1.0


async def test_a_child_cannot_report_from_the_future(deployment: Deployment) -> None:
    """A child's REPORT time is bounded by the parent's clock plus CLOCK_SKEW."""
    from protocol import Report

    with deployment.admin() as admin:
        src = deployment.root / "src-t"
        src.mkdir()
        (src / "payload.bin").write_bytes(b"x")
        pid = admin.add_package(src, "t", "1.0")
        db = admin.db
        envelope = admin.store.envelope(pid)
        assert envelope is not None
        job = db.create_job(JobType.INSTALL, pid, ["client1"], envelope, None, "server")
        future = time.time() + 2 * 3600
        rep = Report(
            report_id="client1:1", job=job, node="client1", state="transferring", seq=1,
            detail="", package=pid, time=future, origin="client1",
        )  # fmt: skip
        db.enroll("client1", "client")
        db.apply_report(rep, forward=False)
        d = db.dest(job, "client1")
        node = db.node("client1")
        assert d is not None and node is not None and node.last_seen is not None
        assert d.updated <= time.time() + CLOCK_SKEW
        assert node.last_seen <= time.time() + CLOCK_SKEW


# == 5. a crashing parent is not hammered =======================================================


async def test_reconnect_backs_off_under_a_crashing_parent(deployment: Deployment) -> None:
    """A parent that welcomes and then drops every session at once: the
    child's reconnects slow down (exponential, with jitter) instead of
    looping at full speed."""
    paths = deployment.server.paths
    ctx = server_context(paths.ca_cert, paths.cert, paths.key)
    arrivals: list[float] = []

    async def crash(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        arrivals.append(time.monotonic())
        conn = Connection(Side.PARENT)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                while (event := conn.next_event()) is NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                assert isinstance(event, Hello)
                writer.writelines(
                    conn.send(Welcome(node="server", role="server", time=time.time()))
                )
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(crash, "127.0.0.1", 0, ssl=ctx)
    try:
        port = server.sockets[0].getsockname()[1]
        cfg = deployment.add_node("client1", Role.CLIENT, ("127.0.0.1", port))
        cfg = replace(cfg, reconnect_min=0.05, reconnect_max=0.8)
        async with running(cfg):
            await asyncio.sleep(4.0)
    finally:
        server.close()
        with contextlib.suppress(ssl.SSLError, TimeoutError):
            async with asyncio.timeout(2):
                await server.wait_closed()
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    print(f"\ncrashing parent: {len(arrivals)} sessions in 4 s, gaps {[round(g, 2) for g in gaps]}")
    assert 3 <= len(arrivals) <= 20, len(arrivals)
    assert max(gaps[-3:]) >= 0.3, gaps  # backed off towards reconnect_max
    assert FAST["reconnect_max"] == 0.5
