"""What a fleet does to reports and sessions, against real nodes over real
TLS: reports that arrive out of order and many times over apply once each;
a relay restarting under many children gets every one of them back; a
re-imaged client's reports are applied, not taken for repeats of its old
ones.

The server and real client nodes run in this event loop (the test looks at
their databases and events); a relay that restarts is a real ``rdsd run``
daemon on a fixed port and home.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from protocol import JobCancel, JobNotice, Message, Report, ReportAck
from rdsd.admin import Admin
from rdsd.child.uplink import Uplink
from rdsd.claims import public_key_der
from rdsd.config import HomePaths, NodeConfig
from rdsd.domain import DestState, Role
from rdsd.events import DestChanged, Subscription
from rdsd.node import Node
from rdsd.parent import downlinks
from rdsd.security import client_context, issue_certificate
from rdsd.state.base import DEFERRED_AUTOCHECKPOINT, Database
from tests.helpers import (
    FAST,
    Deployment,
    RawChild,
    make_payload_dir,
    running,
    wait_state,
    wait_until,
)
from tests.integration.test_faults import Daemon, cli, daemons, fix_port, set_option

S = DestState
DONE = {"installed", "failed"}


async def drain(sub: Subscription) -> list[DestChanged]:
    """The events ``sub`` holds now, without waiting for more."""
    out = []
    while sub.pending:
        event = await anext(sub)
        assert isinstance(event, DestChanged), event
        out.append(event)
    return out


async def acks_for(raw: RawChild, want: Counter[str], timeout: float = 10.0) -> Counter[str]:
    """Read ``raw``'s session until it has an acknowledgement for every copy
    counted in ``want`` (other messages, a job notice, are passed over)."""
    got: Counter[str] = Counter()
    async with asyncio.timeout(timeout):
        while got != want:
            msg = await raw.recv(timeout)
            assert isinstance(msg, Message), f"session ended with {want - got} unacknowledged"
            if isinstance(msg, ReportAck):
                got[msg.report_id] += 1
                assert got[msg.report_id] <= want[msg.report_id], f"extra ack {msg.report_id}"
    return got


# == 1. reordered and repeated reports apply once ==========================================


@pytest.mark.parametrize("via", ["server", "relay"])
async def test_reports_out_of_order_and_repeated_apply_once(
    deployment: Deployment, tmp_path: Path, via: str
) -> None:
    """A client's signed reports for one job (transferring, installing,
    installed) arrive out of order, each several times, over two sessions
    (installed overtakes both; the first session drops before its last
    report is acknowledged, and the next sends it again): every copy is
    acknowledged, the final state is the newest report's (the overtaken
    ones are repeats, not a way back), the server records one state change
    and the install once. Through a relay the same holds at the
    relay and at the server, and the relay's outbox empties."""
    with deployment.admin() as admin:
        pid = admin.add_package(make_payload_dir(tmp_path / "p", size=100), "tool", "1.0")
    async with running(deployment.server) as (server,):
        parents: list[Node] = [server]
        async with contextlib.AsyncExitStack() as stack:
            if via == "relay":
                rcfg = deployment.add_node("relay1", Role.RELAY, server.address)
                (relay,) = await stack.enter_async_context(running(rcfg))
                parents.insert(0, relay)
            below = parents[0]
            ccfg = deployment.add_node("client1", Role.CLIENT, below.address)
            with deployment.admin() as admin:
                job = admin.create_job("install", pid, ["client1"])
            subs = [
                await stack.enter_async_context(n.events(job=job, types=DestChanged))
                for n in parents
            ]

            def report(seq: int, state: DestState) -> Report:
                return Report(
                    report_id=f"client1:{seq}", job=job, node="client1", state=state, seq=seq,
                    package=pid, time=time.time(), origin="client1",
                )  # fmt: skip

            first = await RawChild.connect(below.address, ccfg.home)
            try:
                await first.handshake("client1", purpose="session")
                # The parent the reports go to knows the job (through a relay:
                # once the server has routed client1 there and told it).
                await wait_until(lambda: below.db.job(job) is not None, 10, what="job below")
                r1, r2, r3 = (
                    first.sign(report(1, S.TRANSFERRING)),
                    first.sign(report(2, S.INSTALLING)),
                    first.sign(report(3, S.INSTALLED)),
                )
                # installed overtakes both its predecessors; each comes twice.
                sent = [r3, r1, r3, r1]
                for rep in sent:
                    await first.send(rep)
                await acks_for(first, Counter(r.report_id for r in sent))
                await first.send(r2)  # and the link drops before its ack
            finally:
                await first.close()
            second = await RawChild.connect(below.address, ccfg.home)
            try:
                await second.handshake("client1", purpose="session")
                # What the child still holds (r2, unacknowledged) goes again,
                # twice, with a copy of an acknowledged one between.
                again = [r2, r1, r2]
                for rep in again:
                    await second.send(rep)
                await acks_for(second, Counter(r.report_id for r in again))
            finally:
                await second.close()

            if via == "relay":
                await wait_until(lambda: not relay.db.outbox(), 10, what="relay outbox acked")
            with deployment.admin() as admin:
                await wait_until(
                    lambda: (
                        (d := admin.db.dest(job, "client1")) is not None and d.state is S.INSTALLED
                    ),
                    10,
                    what="installed at the server",
                )
                counts = {j["id"]: j["states"] for j in admin.jobs()}  # job list
                assert counts[job] == {"installed": 1}
                status = admin.job_status(job)["destinations"]  # job status
                assert [(d["node"], d["state"]) for d in status] == [("client1", "installed")]
                assert admin.db.installed() == {"client1": [pid]}
            await asyncio.sleep(0.2)  # anything applied late would show now
            for node, sub in zip(parents, subs, strict=True):
                row = node.db.dest(job, "client1")
                assert row is not None and row.state is S.INSTALLED, (node.cfg.name, row)
                moves = [(e.old, e.new) for e in await drain(sub)]
                # Each state once: the newest report wins at once, the older
                # ones it overtook are repeats. (A relay also records the job
                # arriving from the server, as waiting.)
                arrived = [(None, S.WAITING)] if node is not server else []
                assert moves == [*arrived, (S.WAITING, S.INSTALLED)], (node.cfg.name, moves)
                assert sub.dropped == 0


async def test_a_report_read_as_the_node_stops_is_recorded(
    deployment: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A report waits up to ``REPORT_LINGER`` to share a commit. One read
    just before the node stops is applied before the database closes, not
    after (where it failed with "closed database" and was logged as lost)."""
    monkeypatch.setattr(downlinks, "REPORT_LINGER", 60.0)  # it would wait a minute
    with deployment.admin() as admin:
        pid = admin.add_package(make_payload_dir(tmp_path / "p", size=100), "tool", "1.0")
    server = Node(deployment.server)
    await server.start()
    try:
        ccfg = deployment.add_node("client1", Role.CLIENT, server.address)
        with deployment.admin() as admin:
            job = admin.create_job("install", pid, ["client1"])
        raw = await RawChild.connect(server.address, ccfg.home)
        try:
            await raw.handshake("client1", purpose="session")
            report = Report(
                report_id="client1:1", job=job, node="client1", state=S.TRANSFERRING,
                seq=1, package=pid, time=time.time(), origin="client1",
            )  # fmt: skip
            await raw.send(raw.sign(report))
            below = server.downlinks
            assert below is not None
            await wait_until(lambda: below._reports, 10, what="the report read")
        finally:
            await raw.close()
    finally:
        async with asyncio.timeout(10):
            await server.stop()
    with deployment.admin() as admin:
        row = admin.db.dest(job, "client1")
        assert row is not None and row.state is S.TRANSFERRING


# == 2. a relay restart under many children ======================================================

N_CHILDREN = 200


class Counting:
    """What a light child (a real ``Uplink`` and nothing else) does with what
    its parent sends: counts its sessions and notes the jobs it hears of."""

    def __init__(self) -> None:
        self.sessions = 0
        self.jobs: set[str] = set()

    async def on_connected(self, link: Uplink) -> None:
        self.sessions += 1

    async def on_job_notice(self, notice: JobNotice) -> None:
        self.jobs.add(notice.job)

    async def on_job_cancel(self, cancel: JobCancel) -> None:
        pass

    async def on_revoked(self, nodes: list[str]) -> None:
        pass

    def on_report_ack(self, report_id: str) -> None:
        pass


def light_children(
    deployment: Deployment, names: list[str], parent: tuple[str, int]
) -> list[tuple[Uplink, Counting]]:
    """Children with their own certificates, enrolled on the server as
    ``rdsd enroll`` would record them (in one transaction), each a real
    uplink to ``parent``: TLS with its own key, a signed attach claim in
    HELLO, keepalive, and reconnecting with jittered backoff."""
    server = deployment.server.paths
    ca_cert, ca_key = server.ca_cert.read_bytes(), server.ca_key.read_bytes()
    rows, links = [], []
    fast: dict[str, Any] = dict(FAST)
    for name in names:
        paths = HomePaths(deployment.root / "light" / name)
        paths.tls.mkdir(parents=True)
        cert, key, serial = issue_certificate(ca_cert, ca_key, name, Role.CLIENT)
        paths.cert.write_bytes(cert)
        paths.key.write_bytes(key)
        rows.append((name, Role.CLIENT.value, time.time(), str(serial), public_key_der(cert)))
        cfg = NodeConfig(paths.home, Role.CLIENT, name, parent=parent, **fast)
        handler = Counting()
        ctx = client_context(server.ca_cert, paths.cert, paths.key)
        links.append((Uplink(cfg, ctx, handler), handler))
    with contextlib.closing(sqlite3.connect(server.db)) as db, db:
        db.executemany(
            "INSERT INTO nodes(name, role, enrolled, serial, pubkey) VALUES(?,?,?,?,?)", rows
        )
    return links


def claims_at(db: Path, names: list[str]) -> dict[str, tuple[str | None, int | None]]:
    """(via, counter of the newest attach claim) of each of ``names``."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT name, via, counter FROM nodes").fetchall()
    return {r[0]: (r[1], r[2]) for r in rows if r[0] in set(names)}


def online_through(db: Path, via: str) -> set[str]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute(
            "SELECT name FROM presence WHERE through=? AND online=1", (via,)
        ).fetchall()
    return {r[0] for r in rows} - {via}


async def restart_under(
    deployment: Deployment,
    relay: Daemon,
    light: list[tuple[Uplink, Counting]],
    everyone: list[str],
    pid: str,
    began: float,
) -> tuple[float, float, str, str]:
    """Wait for ``everyone`` to be in under the relay, restart it with a job
    made while it is down, wait for them all again, make another job, and
    wait for every light child to be told of both. Returns how long each
    wait for everyone took and the two jobs."""
    db = deployment.server.paths.db

    def all_online() -> bool:
        return online_through(db, "relay1") >= set(everyone)

    def missing() -> str:
        gone = set(everyone) - online_through(db, "relay1")
        return f"all online through relay1; missing {len(gone)}: {sorted(gone)[:5]}"

    await wait_until(all_online, 30, 0.05, missing)
    first = time.monotonic() - began
    before = claims_at(db, everyone)
    assert all(via == "relay1" for via, _ in before.values())

    await relay.stop()
    await wait_until(lambda: not online_through(db, "relay1"), 10, what="all offline")
    with deployment.admin() as admin:
        pending = admin.create_job("install", pid, everyone)
    began = time.monotonic()
    await relay.start()
    await wait_until(all_online, 30, 0.05, missing)
    back = time.monotonic() - began
    after = claims_at(db, everyone)
    stale = [
        n for n in everyone
        if after[n][0] != "relay1" or (after[n][1] or 0) <= (before[n][1] or 0)
    ]  # fmt: skip
    assert not stale, f"not routed on a new claim: {stale[:5]}"
    # Each light child is in again, on a session of its own making.
    assert all(h.sessions >= 2 and link.session is not None for link, h in light)

    with deployment.admin() as admin:
        later = admin.create_job("install", pid, everyone)

    def told() -> int:
        return sum({pending, later} <= h.jobs for _, h in light)

    await wait_until(
        lambda: told() == len(light), 15, what=lambda: f"{told()} of {len(light)} told of both jobs"
    )
    return first, back, pending, later


async def test_a_relay_restart_gets_every_child_back(
    deployment: Deployment, tmp_path: Path, install_out: Path
) -> None:
    """A relay daemon with 200 light children (real uplinks with their own
    enrolled certificates) and two real client nodes is stopped and started
    again on the same port and home. Every child gets back in by itself:
    the server sees each of them online through the relay again on the
    attach claim it made for the new session, and routes them there. A job
    made while the relay was down, and one made after, reach every child,
    and the real clients install both. None gives up: all are back within
    seconds of the relay listening again."""
    with deployment.admin() as admin:
        pid = admin.add_package(
            make_payload_dir(tmp_path / "p", size=1000), "tool", "1.0", install="sh install.sh"
        )
    async with running(deployment.server) as (server,):
        rcfg = deployment.add_node("relay1", Role.RELAY, server.address)
        relay_addr = fix_port(rcfg.home)
        set_option(rcfg.home, **FAST)
        relay = Daemon(rcfg.home)
        names = [f"c{i:03d}" for i in range(N_CHILDREN)]
        light = light_children(deployment, names, relay_addr)
        real = [deployment.add_node(n, Role.CLIENT, relay_addr) for n in ("real1", "real2")]
        everyone = names + [c.name for c in real]
        async with daemons(relay):
            await relay.start()
            began = time.monotonic()
            async with running(*real), asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(link.run()) for link, _ in light]
                try:
                    first, back, pending, later = await restart_under(
                        deployment, relay, light, everyone, pid, began
                    )
                    with deployment.admin() as admin:
                        for job in (pending, later):
                            for cfg in real:
                                state = await wait_state(admin, job, cfg.name, DONE, 15)
                                assert state == "installed", (job, cfg.name)
                finally:
                    for task in tasks:
                        task.cancel()
    print(
        f"\n{len(everyone)} children under relay1: all in {first:.2f}s, {back:.2f}s after a restart"
    )
    for cfg in real:
        assert (install_out / cfg.name / "env.txt").exists()


# == 3. a re-imaged client's reports apply ===================================================

#: An install that notes each run and fails while ``fail`` exists.
FLAKY_SCRIPT = """#!/bin/sh
echo "$RDSD_JOB" >> "$RDSD_TEST_OUT/runs-$RDSD_NODE.txt"
test ! -e "$RDSD_TEST_OUT/fail"
"""


def server_row(admin: Admin, job: str, node: str) -> tuple[str, str, int]:
    """(state, origin, seq) of a destination in the server's database."""
    row = admin.db._db.execute(
        "SELECT state, origin, seq FROM dests WHERE job=? AND node=?", (job, node)
    ).fetchone()
    assert row is not None
    return str(row[0]), str(row[1]), int(row[2])


async def test_a_reimaged_clients_reports_are_applied(
    deployment: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client reports one job installed and another failed, then is
    re-imaged: its home wiped, enrolled again (``rdsd enroll --force``) and
    set up again (``rdsd init``), so its job database, and the sequence its
    reports are numbered by, start anew. A new job and the retry of the
    failed one (whose destination at the server still carries the old
    sequence) are installed: every report of the new incarnation is applied
    (each state once), none is dropped as a repeat, and nothing runs or
    applies twice."""
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("RDSD_TEST_OUT", str(out))
    runs = out / "runs-client1.txt"
    src = make_payload_dir(tmp_path / "p", size=1000)
    (src / "install.sh").write_text(FLAKY_SCRIPT)
    with deployment.admin() as admin:
        pid = admin.add_package(src, "tool", "1.0", install="sh install.sh")
    async with running(deployment.server) as (server,):
        cfg = deployment.add_node("client1", Role.CLIENT, server.address)
        with deployment.admin() as admin:
            async with running(cfg):
                done = admin.create_job("install", pid, ["client1"])
                assert await wait_state(admin, done, "client1", DONE, 15) == "installed"
                (out / "fail").touch()
                flaky = admin.create_job("install", pid, ["client1"])
                assert await wait_state(admin, flaky, "client1", DONE, 15) == "failed"
                (out / "fail").unlink()
            old = {j: server_row(admin, j, "client1") for j in (done, flaky)}
            assert {o for _, o, _ in old.values()} == {"client1"}

            # Re-imaged: nothing of the old home survives.
            shutil.rmtree(cfg.home)
            bundle = tmp_path / "client1.reimaged.bundle"
            home = str(deployment.server.home)
            code, _, err = await cli(
                "enroll", "client1", "--role", "client", "--out", str(bundle), "--force",
                "--home", home,
            )  # fmt: skip
            assert code == 0, err
            parent = f"{server.address[0]}:{server.address[1]}"
            code, _, err = await cli(
                "init", "client", "--bundle", str(bundle), "--parent", parent,
                "--home", str(cfg.home),
            )  # fmt: skip
            assert code == 0, err
            fresh = NodeConfig.load(cfg.home, **FAST)

            new = admin.create_job("install", pid, ["client1"])
            assert admin.retry(flaky) == ["client1"]
            async with (
                server.events(node="client1", types=DestChanged) as sub,
                running(fresh) as (client,),
            ):
                for job in (new, flaky):
                    assert await wait_state(admin, job, "client1", DONE, 15) == "installed"
                await wait_until(lambda: not client.db.outbox(), 10, what="outbox acked")
                await asyncio.sleep(0.2)  # anything applied late would show now
                seen = await drain(sub)
                mine = {
                    job: client.db._db.execute(
                        "SELECT seq FROM dests WHERE job=? AND node='client1'", (job,)
                    ).fetchone()[0]
                    for job in (new, flaky)
                }
            assert sub.dropped == 0
            for job in (new, flaky):
                state, origin, seq = server_row(admin, job, "client1")
                assert (state, origin) == ("installed", "client1")
                assert seq == mine[job], "the server holds the client's newest report"
                assert seq > max(s for _, _, s in old.values())
                moves = [(e.old, e.new) for e in seen if e.job == job]
                changes = [b for a, b in moves if a != b]
                assert changes == [S.TRANSFERRING, S.INSTALLING, S.INSTALLED], (job, moves)
                # The rest are progress details of the transfer.
                assert all(a == b == S.TRANSFERRING for a, b in moves if a == b), moves
            assert server_row(admin, done, "client1") == old[done], "the old job is left alone"
            assert not [e for e in seen if e.job == done]
    assert runs.read_text().split() == [done, flaky, flaky, new] or (
        runs.read_text().split() == [done, flaky, new, flaky]
    )


async def test_a_running_node_checkpoints_its_database_log_in_a_thread(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A running node's commits leave the write-ahead log alone (SQLite's
    own limit is raised far out of the way) and its checkpointer copies the
    log into the database every second in a thread, never on the event
    loop's thread."""
    on_loop_thread: list[bool] = []
    original = Database.checkpoint

    def recording(self: Database) -> tuple[int, int]:
        on_loop_thread.append(threading.current_thread() is threading.main_thread())
        return original(self)

    monkeypatch.setattr(Database, "checkpoint", recording)
    async with running(deployment.server) as (server,):
        limit = server.db._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
        assert limit == DEFERRED_AUTOCHECKPOINT
        await wait_until(lambda: len(on_loop_thread) >= 2, 10, what="two checkpoints")
    assert not any(on_loop_thread)
