"""Embedding rdsd in an asyncio application: the async admin API and the
event stream, with nodes in this loop over real TLS on 127.0.0.1.

What an embedder is promised: every state change of a destination arrives
in order with consistent old and new states, on the server and on the
client; filters hold on a live node; the async admin API has the command
line's validation and errors and never blocks the loop, even while another
connection holds the database's write lock; and the two examples run.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from rdsd import (
    Admin,
    AdminError,
    AsyncAdmin,
    ChildConnected,
    ChildDisconnected,
    DestChanged,
    DestState,
    Event,
    EventBusClosed,
    EventsDropped,
    HelloPurpose,
    JobReceived,
    JobType,
    Node,
    PackageStored,
    Role,
    Subscription,
    TransferProgress,
    UserError,
)
from rdsd.errors import ConfigError
from tests.helpers import Deployment, enroll_node, rdsd_cmd, running

REPO = Path(__file__).resolve().parents[2]
S = DestState
BOUND = 30.0  # no job in these tests may take longer


async def take_until_final(sub: Subscription, job: str, node: str) -> list[Event]:
    """Everything ``sub`` yields until ``node``'s destination of ``job`` is
    final (that change included), within ``BOUND`` seconds. A dropped event
    fails the test: nothing here may fall behind."""
    seen: list[Event] = []
    async with asyncio.timeout(BOUND):
        async for event in sub:
            assert not isinstance(event, EventsDropped), seen
            seen.append(event)
            if (
                isinstance(event, DestChanged)
                and (event.job, event.node) == (job, node)
                and event.new.final
            ):
                return seen
    raise AssertionError(f"the stream ended before {job}/{node} was final: {seen}")


async def next_of(sub: Subscription, kind: type[Event], timeout: float = 10.0) -> Event:
    """The next event of type ``kind`` (others are skipped), within ``timeout``."""
    async with asyncio.timeout(timeout):
        async for event in sub:
            if isinstance(event, kind):
                return event
    raise AssertionError(f"the stream ended before a {kind.__name__}")


def changes_of(events: list[Event], job: str, node: str) -> list[DestChanged]:
    return [e for e in events if isinstance(e, DestChanged) and (e.job, e.node) == (job, node)]


def assert_consistent(changes: list[DestChanged]) -> list[DestState]:
    """Each change starts where the previous one ended; the first creates
    the destination. Returns the states passed through (detail updates
    within one state collapsed)."""
    assert changes and changes[0].old is None and changes[0].new is S.WAITING, changes
    for before, after in itertools.pairwise(changes):
        assert after.old == before.new, (before, after)
    path: list[DestState] = [changes[0].new]
    for change in changes[1:]:
        if change.new != path[-1]:
            path.append(change.new)
    return path


# -- the whole life of one destination, seen from both ends ------------------------


async def test_every_state_change_of_a_destination_arrives_in_order(
    deployment: Deployment, package_src: Path, install_out: Path
) -> None:
    async with running(deployment.server) as [server]:
        on_server = server.events()
        cfg = deployment.add_node("c1", Role.CLIENT, server.address)
        async with running(cfg) as [client]:
            on_client = client.events()
            joined = await next_of(on_server, ChildConnected)
            assert isinstance(joined, ChildConnected)
            assert (joined.source, joined.child, joined.role, joined.purpose) == (
                "server",
                "c1",
                Role.CLIENT,
                HelloPurpose.SESSION,
            )
            async with AsyncAdmin(deployment.server.home, node=server) as admin:
                pid = await admin.add_package(package_src, "app", "1.0", install="./install.sh")
                job = await admin.create_job(JobType.INSTALL, pid, ["c1"])
                server_events = await take_until_final(on_server, job, "c1")
                client_events = await take_until_final(on_client, job, "c1")
                status = await admin.job_status(job)

        left = await next_of(on_server, ChildDisconnected)
        assert isinstance(left, ChildDisconnected) and left.child == "c1", left

    expected = [S.WAITING, S.TRANSFERRING, S.INSTALLING, S.INSTALLED]
    server_changes = changes_of(server_events, job, "c1")
    assert assert_consistent(server_changes) == expected
    assert {(c.source, c.package) for c in server_changes} == {("server", pid)}
    assert status["destinations"][0]["state"] == S.INSTALLED

    client_changes = changes_of(client_events, job, "c1")
    assert assert_consistent(client_changes) == expected
    assert {(c.source, c.package) for c in client_changes} == {("c1", pid)}
    # The job arrives before anything happens to it, and the bytes are all
    # in (100%, then stored) before the install starts.
    received = [e for e in client_events if isinstance(e, JobReceived)]
    assert len(received) == 1 and client_events.index(received[0]) == 0, client_events
    assert (received[0].job, received[0].job_type, received[0].package) == (
        job,
        JobType.INSTALL,
        pid,
    )
    assert received[0].destinations == ("c1",)
    progress = [e for e in client_events if isinstance(e, TransferProgress)]
    assert progress and progress[-1].done == progress[-1].total > 0, progress
    assert {(p.job, p.node, p.package) for p in progress} == {(job, "c1", pid)}
    assert all(p.rate > 0 for p in progress), progress
    stored = [e for e in client_events if isinstance(e, PackageStored)]
    assert len(stored) == 1 and stored[0].size == progress[-1].total, stored
    order = client_events.index
    installing = next(c for c in client_changes if c.new is S.INSTALLING)
    assert order(progress[-1]) < order(stored[0]) < order(installing)


# -- filters, on a live node ----------------------------------------------------------


async def drain(sub: Subscription) -> list[Event]:
    """Everything ``sub`` holds once its node has stopped (iteration ends
    after the buffered events)."""
    async with asyncio.timeout(5):
        return [event async for event in sub]


async def test_filters_by_job_node_and_type_on_a_live_node(
    deployment: Deployment, package_src: Path, install_out: Path
) -> None:
    async with running(deployment.server) as [server]:
        only_c2 = server.events(node="c2", types=DestChanged)
        arrivals = server.events(types=(ChildConnected, ChildDisconnected))
        cfgs = [deployment.add_node(n, Role.CLIENT, server.address) for n in ("c1", "c2")]
        async with running(*cfgs), AsyncAdmin(deployment.server.home, node=server) as admin:
            for _ in range(2):
                await next_of(arrivals, ChildConnected)
            pid = await admin.add_package(package_src, "app", "1.0", install="./install.sh")
            # Scheduled a moment ahead so nothing moves before the filter on
            # its id exists; the second job must be kept out of it.
            job_a = await admin.create_job(JobType.INSTALL, pid, ["c1", "c2"], time.time() + 1.5)
            only_job_a = server.events(job=job_a)
            job_b = await admin.create_job(JobType.INSTALL, pid, ["c2"])
            for job, node in ((job_a, "c1"), (job_a, "c2"), (job_b, "c2")):
                assert await server.wait_for(job, node, {S.INSTALLED}, timeout=BOUND)

    by_job = await drain(only_job_a)
    by_node = await drain(only_c2)
    by_type = await drain(arrivals)

    assert by_job and all(isinstance(e, DestChanged) and e.job == job_a for e in by_job)
    assert {e.node for e in by_job if isinstance(e, DestChanged)} == {"c1", "c2"}
    assert by_node and all(isinstance(e, DestChanged) and e.node == "c2" for e in by_node)
    assert {e.job for e in by_node if isinstance(e, DestChanged)} == {job_a, job_b}
    for job in (job_a, job_b):
        assert assert_consistent(changes_of(by_node, job, "c2"))[-1] is S.INSTALLED
    # Only the two types asked for: the two clients leaving as the test ends.
    assert by_type and {type(e) for e in by_type} == {ChildDisconnected}
    assert sorted(e.child for e in by_type if isinstance(e, ChildDisconnected)) == ["c1", "c2"]


async def test_waiting_ends_with_a_clear_error_when_the_node_stops(
    deployment: Deployment,
) -> None:
    async with running(deployment.server) as [server]:
        waiter = asyncio.create_task(server.wait_for("jnosuchjob", "c1", S.INSTALLED, None))
        await asyncio.sleep(0.05)
        assert not waiter.done()
    with pytest.raises(EventBusClosed):
        async with asyncio.timeout(5):
            await waiter


# -- what the async admin API does besides jobs ---------------------------------------


async def test_async_admin_refuses_what_the_command_line_refuses(
    deployment: Deployment,
) -> None:
    home = deployment.server.home
    async with AsyncAdmin(home) as admin:
        with pytest.raises(AdminError) as refused:
            await admin.create_job(JobType.INSTALL, "nosuch-1.0", ["c1"])
        with pytest.raises(UserError, match="no job"):
            await admin.cancel("jnosuchjob")
        assert await admin.jobs() == []
    cli = await asyncio.create_subprocess_exec(
        *rdsd_cmd(),
        "job",
        "create",
        "--home",
        str(home),
        "--type",
        "install",
        "--package",
        "nosuch-1.0",
        "--to",
        "c1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(BOUND):
        _, err = await cli.communicate()
    assert cli.returncode == 1
    assert err.decode().strip() == f"rdsd: error: {refused.value}"


async def test_async_admin_changes_are_events_of_the_node_it_is_attached_to(
    deployment: Deployment, package_src: Path
) -> None:
    enroll_node(deployment, "c1", Role.CLIENT)
    async with running(deployment.server) as [server]:
        changes = server.events(types=DestChanged)
        async with AsyncAdmin(deployment.server.home, node=server) as admin:
            pid = await admin.add_package(package_src, "app", "1.0")
            later = time.time() + 3600  # scheduled: nothing moves by itself
            job = await admin.create_job(JobType.INSTALL, pid, ["c1"], at=later)
            # The admin thread's commit wakes a waiter on the loop, no polling.
            waiter = asyncio.create_task(server.wait_for(job, "c1", S.CANCELLED, timeout=5))
            await asyncio.sleep(0.05)
            assert not waiter.done()
            assert await admin.cancel(job) == ["c1"]
            assert await waiter is S.CANCELLED
        seen = [await next_of(changes, DestChanged, timeout=5) for _ in range(2)]
    assert [(e.old, e.new, e.detail) for e in seen if isinstance(e, DestChanged)] == [
        (None, S.WAITING, ""),
        (S.WAITING, S.CANCELLED, "cancelled by the operator"),
    ]


# -- never blocking the loop ----------------------------------------------------------


class LagMeter:
    """How late a 5 ms ticker on this loop wakes: the longest stretch any
    other code held the loop."""

    PERIOD = 0.005

    def __init__(self) -> None:
        self.lags: list[float] = []

    @property
    def worst(self) -> float:
        return max(self.lags, default=0.0)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[LagMeter]:
        loop = asyncio.get_running_loop()

        async def tick() -> None:
            while True:
                start = loop.time()
                await asyncio.sleep(self.PERIOD)
                self.lags.append(loop.time() - start - self.PERIOD)

        ticker = asyncio.create_task(tick())
        try:
            yield self
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker


@contextlib.contextmanager
def write_locked(db: Path) -> Iterator[sqlite3.Connection]:
    """Another connection holding the database's write lock until the block
    ends (or until the caller ends its transaction)."""
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")
        yield other
    finally:
        if other.in_transaction:
            other.execute("ROLLBACK")
        other.close()


async def test_no_admin_call_blocks_the_loop_while_another_writer_holds_the_database(
    deployment: Deployment, package_src: Path
) -> None:
    enroll_node(deployment, "c1", Role.CLIENT)
    home = deployment.server.home
    with Admin(home) as sync_admin:
        pid = sync_admin.add_package(package_src, "app", "1.0")
    async with AsyncAdmin(home) as admin:
        with write_locked(deployment.server.paths.db):
            async with LagMeter().running() as meter:
                # Readers are not held up by a writer (WAL).
                assert [p.id for p in await admin.packages()] == [pid]
                assert await admin.jobs() == []
                assert [n["name"] for n in await admin.nodes()] == ["c1"]
                create = asyncio.create_task(admin.create_job(JobType.INSTALL, pid, ["c1"]))
                await asyncio.sleep(1.0)
                waited = not create.done()
            worst_while_locked = meter.worst
        # The lock is released: the write goes through.
        async with asyncio.timeout(5):
            job = await create
        assert (await admin.job_status(job))["destinations"][0]["state"] == S.WAITING
    assert waited, "the write should have waited for the lock"
    assert len(meter.lags) > 50, meter.lags  # the loop kept ticking all along
    assert worst_while_locked < 0.1, f"the loop stalled for {worst_while_locked * 1000:.0f} ms"


async def test_the_lag_meter_sees_a_blocking_call(
    deployment: Deployment, package_src: Path
) -> None:
    """The same measurement around the synchronous Admin: the loop stalls
    for as long as the lock is held, so the bound above means something."""
    enroll_node(deployment, "c1", Role.CLIENT)
    with Admin(deployment.server.home) as admin:
        pid = admin.add_package(package_src, "app", "1.0")
        with write_locked(deployment.server.paths.db) as other:
            release = threading.Timer(0.3, other.execute, ("ROLLBACK",))
            async with LagMeter().running() as meter:
                await asyncio.sleep(0.02)
                release.start()
                admin.create_job(JobType.INSTALL, pid, ["c1"])
                await asyncio.sleep(0.02)
            release.join(5)
    assert meter.worst > 0.2, meter.lags


# -- the examples -----------------------------------------------------------------------


def run_example(name: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / name)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout


def test_embed_example_follows_a_job_to_installed() -> None:
    lines = run_example("embed.py").splitlines()
    assert "laptop connected (client)" in lines, lines
    assert [line for line in lines if line.startswith("laptop: ")] == [
        "laptop: new -> waiting",
        "laptop: waiting -> transferring",
        "laptop: transferring -> installing",
        "laptop: installing -> installed",
    ]
    assert lines[-1].startswith("job j") and lines[-1].endswith(": laptop installed"), lines


def test_progress_example_prints_a_live_progress_bar() -> None:
    lines = run_example("progress.py").splitlines()
    assert lines[0].startswith("job j") and lines[0].endswith("received: install bigapp-1.0")
    bars = [line for line in lines if line.startswith("[")]
    assert bars and "100%" in bars[-1] and "32.0 of 32.0 MiB" in bars[-1], lines
    assert "bigapp-1.0 stored (32.0 MiB)" in lines
    assert lines.index(bars[-1]) < lines.index("bigapp-1.0 stored (32.0 MiB)")
    assert lines[-3:] == [
        "ws-001: transferring -> installing",
        "ws-001: installing -> installed",
        "done: ws-001 installed",
    ]


async def test_a_node_whose_configuration_and_certificate_disagree_refuses_to_start(
    deployment: Deployment,
) -> None:
    """A home whose rdsd.toml names another node than its certificate would be
    refused by its parent on every connect; it is refused at start instead,
    naming both identities."""
    server = deployment.server
    async with running(server) as (srv,):
        cfg = deployment.add_node("client1", Role.CLIENT, srv.address)
        wrong = replace(cfg, name="client2")
        with pytest.raises(ConfigError) as info:
            async with Node(wrong):
                pass
        message = str(info.value)
        assert "says client2 (client)" in message
        assert "is for client1 (client)" in message
        async with running(cfg) as (client,):
            assert client.uplink is not None
