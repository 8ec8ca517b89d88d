"""Bandwidth limits and time windows between real nodes over real TLS.

What the README's "Pacing and windows" promises: a paced transfer keeps to
its rate and finishes; pings are answered at once while data is paced;
children share an upload limit evenly; a transfer window holds a fetch,
pauses it between chunks and lets it go on from its verified offset; an
install waits for its window while status says until when; a reload
changes a running node's limit.

Windows are decided on the node's clock, which the code takes as a
parameter: here a clock shifted a little before a window opens, so the
window opens for real a second or two later.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import structlog.testing

from protocol import Chunk, Fetch, FetchEnd, Ping, Pong
from rdsd.config import NodeConfig
from rdsd.domain import JobPace, Role
from rdsd.node import Node
from rdsd.util.windows import local_minute
from tests.helpers import (
    Deployment,
    RawChild,
    make_payload_dir,
    running,
    traffic,
    wait_routed,
    wait_state,
    wait_until,
)

MB = 1_000_000
KIB = 1024
DONE = {"installed", "failed"}


def chunked(cfg: NodeConfig, chunk: int) -> NodeConfig:
    """``cfg`` with packages made in ``chunk``-byte chunks, written to its
    rdsd.toml so the admin API packs with it too."""
    new = replace(cfg, chunk_size=chunk)
    new.save()
    return new


def add_package(d: Deployment, root: Path, size: int, name: str = "tool") -> str:
    src = make_payload_dir(root / name, size)
    with d.admin() as admin:
        return admin.add_package(src, name, "1.0", install="sh install.sh")


def verified(node: Node, package: str) -> int:
    """Bytes of ``package`` the node has received and checked so far."""
    if node.store.has(package):
        return node.store.manifest(package).size  # type: ignore[union-attr]
    dl = node.store.active(package)
    return dl.verified if dl is not None else 0


class ShiftedClock:
    """The node's clock, ``offset`` seconds from the real one: it runs at
    real speed, and a test moves it to just before a window."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def set(self, when: float) -> None:
        self.offset = when - time.time()


def next_minute() -> float:
    """The next whole minute, epoch seconds (a local minute starts there)."""
    return (time.time() // 60 + 1) * 60


def window_at(t: float, minutes: int = 1) -> tuple[int, int]:
    start = local_minute(t)
    return start, (start + minutes) % 1440


async def test_paced_transfer_keeps_its_rate_and_finishes(
    deployment: Deployment, tmp_path: Path, install_out: Path
) -> None:
    """A job paced at 1 MB/s: over 5 s in the middle of the transfer the
    client receives within 10 % of 1 MB/s, and the install completes."""
    deployment.server = chunked(deployment.server, 64 * KIB)
    pid = add_package(deployment, tmp_path, 8 * MB)
    async with running(deployment.server) as (server,):
        c1 = deployment.add_node("client1", Role.CLIENT, server.address)
        async with running(c1) as (client,):
            with deployment.admin() as admin:
                await wait_routed(admin, "client1", "client1")
                job = admin.create_job("install", pid, ["client1"], pace=JobPace(rate=1 * MB))
                # Past the first chunk's burst, then five seconds of data.
                await wait_until(lambda: verified(client, pid) >= 1.5 * MB, 10)
                t0, v0 = time.monotonic(), verified(client, pid)
                await asyncio.sleep(5.0)
                t1, v1 = time.monotonic(), verified(client, pid)
                rate = (v1 - v0) / (t1 - t0)
                assert 0.9 * MB <= rate <= 1.1 * MB, f"{rate / MB:.3f} MB/s"
                status = admin.job_status(job)
                assert status["rate"] == 1 * MB
                assert await wait_state(admin, job, "client1", DONE, 30) == "installed"
    assert (install_out / "client1" / "payload.bin").stat().st_size == 8 * MB


async def test_pings_are_answered_at_once_under_a_1mb_limit(
    deployment: Deployment, tmp_path: Path
) -> None:
    """A child fetching at 1 MB/s (per_child_rate) with 1 MiB chunks: each
    ping it sends mid-transfer is answered within a second, between chunks."""
    pid = add_package(deployment, tmp_path, 5 * MB)
    cfg = replace(deployment.server, per_child_rate=1 * MB)
    async with running(cfg) as (server,):
        deployment.add_node("client1", Role.CLIENT, server.address)
        with deployment.admin() as admin:
            admin.create_job("install", pid, ["client1"])
            manifest = admin.store.manifest(pid)
            assert manifest is not None
        child = await RawChild.connect(server.address, deployment.configs["client1"].home)
        try:
            await child.handshake("client1", purpose="session")
            await child.send(Fetch(fetch_id=1, package=pid))
            start = time.monotonic()
            pings: dict[int, float] = {}
            answered: list[float] = []
            received = 0
            while True:
                msg = await child.recv(timeout=10)
                now = time.monotonic()
                if isinstance(msg, Chunk):
                    received += len(msg.data)
                    if len(pings) < 3:
                        nonce = len(pings) + 1
                        pings[nonce] = now
                        await child.send(Ping(nonce=nonce))
                elif isinstance(msg, Pong) and msg.nonce in pings:
                    answered.append(now - pings[msg.nonce])
                elif isinstance(msg, FetchEnd):
                    break
            elapsed = time.monotonic() - start
        finally:
            await child.close()
    assert len(answered) == 3, answered
    assert max(answered) < 1.0, answered
    # And the data was paced: 5 MB less the first chunk's burst at 1 MB/s.
    assert received == manifest.size
    assert elapsed >= (manifest.size - 1024 * KIB) / MB * 0.9, elapsed


async def test_a_chunk_slower_than_the_idle_timeout_still_arrives(
    deployment: Deployment, tmp_path: Path, install_out: Path
) -> None:
    """Paced at 20 kB/s, each 64 KiB chunk takes over 3 s, longer than the
    client's 2 s idle timeout: the session lives on its pings, the fetch
    waits for its chunks, and the install completes."""
    deployment.server = chunked(deployment.server, 64 * KIB)
    pid = add_package(deployment, tmp_path, 1024 * KIB + 64 * KIB)
    cfg = replace(deployment.server, per_child_rate=20_000.0)
    async with running(cfg) as (server,):
        c1 = deployment.add_node("client1", Role.CLIENT, server.address)
        c1 = replace(c1, idle_timeout=2.0, ping_interval=0.5)
        with structlog.testing.capture_logs() as logs:
            async with running(c1):
                with deployment.admin() as admin:
                    await wait_routed(admin, "client1", "client1")
                    job = admin.create_job("install", pid, ["client1"])
                    start = time.monotonic()
                    assert await wait_state(admin, job, "client1", DONE, 30) == "installed"
                    assert time.monotonic() - start >= 3.0  # it was paced
    failed = [e for e in logs if e["event"] == "fetch.failed"]
    assert not failed, failed  # one attempt, however long each chunk took


async def test_children_share_the_upload_limit_evenly(
    deployment: Deployment, tmp_path: Path, install_out: Path
) -> None:
    """Three clients under a server with upload_rate 1.5 MB/s and
    per_child_rate 1 MB/s: each gets about a third of the total, none more
    than its own limit, and the total stays within the upload limit."""
    server_cfg = replace(chunked(deployment.server, 64 * KIB), upload_rate=1.5 * MB)
    server_cfg = replace(server_cfg, per_child_rate=1 * MB)
    pid = add_package(deployment, tmp_path, 3 * MB)
    names = ["client1", "client2", "client3"]
    async with running(server_cfg) as (server,):
        cfgs = [deployment.add_node(n, Role.CLIENT, server.address) for n in names]
        async with running(*cfgs) as clients:
            with deployment.admin() as admin:
                for n in names:
                    await wait_routed(admin, n, n)
                job = admin.create_job("install", pid, names)
                await wait_until(lambda: all(verified(c, pid) >= 0.5 * MB for c in clients), 15)
                before = [verified(c, pid) for c in clients]
                t0 = time.monotonic()
                await asyncio.sleep(3.0)
                after = [verified(c, pid) for c in clients]
                span = time.monotonic() - t0
                rates = [(b - a) / span for a, b in zip(before, after, strict=True)]
                for n in names:
                    assert await wait_state(admin, job, n, DONE, 30) == "installed"
    total = sum(rates)
    shown = [round(r / MB, 3) for r in rates]
    assert total <= 1.5 * MB * 1.1, shown
    assert total >= 1.5 * MB * 0.8, shown
    for r in rates:
        assert abs(r - total / 3) <= 0.2 * total / 3, shown
        assert r <= 1 * MB * 1.1, shown


async def test_a_transfer_window_holds_pauses_and_resumes(
    deployment: Deployment, tmp_path: Path, install_out: Path
) -> None:
    """A client with transfer windows at minutes W and W+2 of its clock:
    before W it fetches nothing and says until when; at W it fetches; when
    the window closes mid-transfer it stops after the chunk in flight; when
    the next window opens it goes on from its verified offset (nothing is
    sent twice) and the install completes."""
    deployment.server = chunked(deployment.server, 64 * KIB)
    pid = add_package(deployment, tmp_path, 4 * MB)
    w = next_minute() + 600  # a minute of the client's clock, ten minutes on
    first, second = window_at(w), window_at(w + 120)
    clock = ShiftedClock()
    clock.set(w - 1.5)
    async with running(deployment.server) as (server,):
        c1 = deployment.add_node("client1", Role.CLIENT, server.address)
        c1 = replace(c1, transfer_windows=(first, second))
        async with running(c1) as (client,):
            assert client.gate is not None
            client.gate.clock = clock
            with deployment.admin() as admin:
                await wait_routed(admin, "client1", "client1")
                job = admin.create_job("install", pid, ["client1"], pace=JobPace(rate=1 * MB))
                # Held, and the server hears until when.
                hhmm = time.strftime("%H:%M", time.localtime(w))
                await wait_until(
                    lambda: f"waiting for window {hhmm}" in _detail(admin, job), 5,
                    what=lambda: _detail(admin, job),
                )  # fmt: skip
                assert admin.db.dest(job, "client1").state == "waiting"  # type: ignore[union-attr]
                assert traffic(server).served["client1"] == 0
                # The window opens for real about 1.5 s later.
                await wait_until(lambda: verified(client, pid) >= 1 * MB, 10)
                # Close it mid-transfer: the fetch stops after its chunk.
                running_dl = client.store.active(pid)
                assert running_dl is not None
                clock.set(w + 60)
                hhmm2 = time.strftime("%H:%M", time.localtime(w + 120))
                await wait_until(lambda: client.gate.held(pid) is not None, 5)  # type: ignore[union-attr]
                await asyncio.sleep(0.5)
                assert client.store.active(pid) is None  # paused, prefix kept
                kept = running_dl.verified
                assert kept % (64 * KIB) == 0 and 1 * MB <= kept < 4 * MB
                served = traffic(server).served["client1"]
                await asyncio.sleep(1.0)
                assert traffic(server).served["client1"] == served  # nothing while held
                await wait_until(
                    lambda: f"waiting for window {hhmm2}" in _detail(admin, job), 5,
                    what=lambda: _detail(admin, job),
                )  # fmt: skip
                # The next window: on from the verified offset, to the end.
                clock.set(w + 120 - 1.0)
                client.gate.notify()
                assert await wait_state(admin, job, "client1", DONE, 30) == "installed"
    # The tail after the pause was sent once: nothing from byte zero again.
    assert traffic(server).served["client1"] <= 4 * MB + 2 * 64 * KIB


async def test_a_relays_window_holds_its_children_without_failing_them(
    deployment: Deployment, tmp_path: Path, install_out: Path
) -> None:
    """A client under a relay whose transfer window is closed: the relay
    does not fetch, the client's attempts count no failure and its status
    names the relay's window; when the window opens both go on."""
    pid = add_package(deployment, tmp_path, 1 * MB)
    w = next_minute() + 600
    clock = ShiftedClock()
    clock.set(w - 60)
    async with running(deployment.server) as (server,):
        r1 = deployment.add_node("relay1", Role.RELAY, server.address)
        r1 = replace(r1, transfer_windows=(window_at(w, 5),))
        async with running(r1) as (relay,):
            assert relay.gate is not None
            relay.gate.clock = clock
            c1 = deployment.add_node("client1", Role.CLIENT, relay.address)
            async with running(c1):
                with deployment.admin() as admin:
                    await wait_routed(admin, "client1", "relay1")
                    job = admin.create_job("install", pid, ["client1"])
                    hhmm = time.strftime("%H:%M", time.localtime(w))
                    await wait_until(
                        lambda: f"relay1 is waiting for window {hhmm}" in _detail(admin, job),
                        15, what=lambda: _detail(admin, job),
                    )  # fmt: skip
                    # Several attempts later it has still not failed.
                    await asyncio.sleep(2.0)
                    assert admin.db.dest(job, "client1").state == "waiting"  # type: ignore[union-attr]
                    assert traffic(server).served["relay1"] == 0
                    clock.set(w - 1.0)
                    relay.gate.notify()
                    assert await wait_state(admin, job, "client1", DONE, 30) == "installed"


async def test_a_jobs_rate_and_windows_reach_every_hop(
    deployment: Deployment, tmp_path: Path, install_out: Path
) -> None:
    """A job made on the server reaches the relay and the client with its
    rate and windows; one made on the relay reaches the server with its
    own (JOB_ANNOUNCE), so each hop paces and holds it the same way."""
    pid = add_package(deployment, tmp_path, 256 * KIB)
    all_day = (0, 1440)
    pace = JobPace(rate=2 * MB, windows=(all_day,))
    async with running(deployment.server) as (server,):
        r1 = deployment.add_node("relay1", Role.RELAY, server.address)
        async with running(r1) as (relay,):
            c1 = deployment.add_node("client1", Role.CLIENT, relay.address)
            async with running(c1) as (client,):
                with deployment.admin() as admin:
                    await wait_routed(admin, "client1", "relay1")
                    job = admin.create_job("install", pid, ["client1"], pace=pace)
                    assert await wait_state(admin, job, "client1", DONE, 20) == "installed"
                    assert relay.db.job_pace(job) == pace
                    assert client.db.job_pace(job) == pace
                # Made on the relay, announced up.
                with deployment.admin("relay1") as radmin:
                    own = JobPace(rate=3 * MB, windows=((60, 120), (1320, 360)))
                    rjob = radmin.create_job("install", pid, ["client1"], pace=own)
                await wait_until(lambda: server.db.job_pace(rjob) == own, 10)
                await wait_until(lambda: client.db.job_pace(rjob) == own, 10)


async def test_an_install_waits_for_its_window(
    deployment: Deployment, tmp_path: Path, install_out: Path
) -> None:
    """The package arrives at once; the install command waits for the
    client's install window, and status (here and on the server) says
    until when."""
    pid = add_package(deployment, tmp_path, 1 * MB)
    w = next_minute() + 3600
    clock = ShiftedClock()
    clock.set(w - 30)
    async with running(deployment.server) as (server,):
        c1 = deployment.add_node("client1", Role.CLIENT, server.address)
        c1 = replace(c1, install_windows=(window_at(w, 60),))
        async with running(c1) as (client,):
            assert client.gate is not None
            client.gate.clock = clock
            with deployment.admin() as admin:
                await wait_routed(admin, "client1", "client1")
                job = admin.create_job("install", pid, ["client1"])
                hhmm = time.strftime("%H:%M", time.localtime(w))
                await wait_until(
                    lambda: f"waiting for window {hhmm} (install" in _detail(admin, job), 10,
                    what=lambda: _detail(admin, job),
                )  # fmt: skip
                assert admin.db.dest(job, "client1").state == "waiting"  # type: ignore[union-attr]
                assert client.store.has(pid)  # arrived outside the window
                assert not (install_out / "client1").exists()
                # The client's own status says the same.
                mine = client.db.dest(job, "client1")
                assert mine is not None and f"waiting for window {hhmm}" in mine.detail
                # Two seconds before the window opens.
                clock.set(w - 2.0)
                client.gate.notify()
                assert await wait_state(admin, job, "client1", DONE, 15) == "installed"
    assert (install_out / "client1" / "env.txt").exists()


async def test_reload_changes_a_running_nodes_limit(
    deployment: Deployment, tmp_path: Path, install_out: Path
) -> None:
    """A server paced at 400 kB/s to its child is reloaded with 4 MB/s from
    its rdsd.toml: the running transfer speeds up from its next chunks."""
    slow = replace(chunked(deployment.server, 64 * KIB), upload_rate=400_000.0)
    slow.save()
    pid = add_package(deployment, tmp_path, 4 * MB)
    async with running(slow) as (server,):
        c1 = deployment.add_node("client1", Role.CLIENT, server.address)
        async with running(c1) as (client,):
            with deployment.admin() as admin:
                await wait_routed(admin, "client1", "client1")
                job = admin.create_job("install", pid, ["client1"])
                await wait_until(lambda: verified(client, pid) >= 1.2 * MB, 10)
                before = await _rate(lambda: verified(client, pid), 1.5)
                assert before <= 400_000 * 1.2, before
                replace(slow, upload_rate=4 * MB).save()
                taken = server.reload(
                    NodeConfig.load(slow.home, **{k: v for k, v in _fast(slow).items()})
                )
                assert taken.upload_rate == 4 * MB
                assert admin.limits()["upload_rate"] == 4 * MB
                after = await _rate(lambda: verified(client, pid), 0.5)
                assert after >= 2 * MB, (before, after)
                assert await wait_state(admin, job, "client1", DONE, 15) == "installed"


async def test_reload_changes_a_running_clients_download_limit(
    deployment: Deployment, tmp_path: Path, install_out: Path
) -> None:
    """A client under the server with download_rate 400 kB/s is reloaded
    with 4 MB/s: its running fetch asks again from its verified offset at
    the new rate (nothing is sent twice but the chunks in flight)."""
    deployment.server = chunked(deployment.server, 64 * KIB)
    pid = add_package(deployment, tmp_path, 4 * MB)
    async with running(deployment.server) as (server,):
        c1 = deployment.add_node("client1", Role.CLIENT, server.address)
        c1 = replace(c1, download_rate=400_000.0)
        async with running(c1) as (client,):
            with deployment.admin() as admin:
                await wait_routed(admin, "client1", "client1")
                job = admin.create_job("install", pid, ["client1"])
                await wait_until(lambda: verified(client, pid) >= 1.2 * MB, 10)
                before = await _rate(lambda: verified(client, pid), 1.5)
                assert before <= 400_000 * 1.2, before
                client.reload(replace(c1, download_rate=4 * MB))
                await wait_until(lambda: verified(client, pid) > 0, 5)  # the next attempt
                after = await _rate(lambda: verified(client, pid), 0.5)
                assert after >= 2 * MB, (before, after)
                assert await wait_state(admin, job, "client1", DONE, 15) == "installed"
    assert traffic(server).served["client1"] <= 4 * MB + 12 * 64 * KIB


# -- helpers ------------------------------------------------------------------------------


def _detail(admin: object, job: str) -> str:
    from rdsd.admin import Admin

    assert isinstance(admin, Admin)
    dest = admin.db.dest(job, "client1")
    return dest.detail if dest is not None else ""


def _fmt(window: tuple[int, int]) -> str:
    from rdsd.util.parse import format_window

    return format_window(window)


def _fast(cfg: NodeConfig) -> dict[str, object]:
    from tests.helpers import FAST

    return {k: getattr(cfg, k) for k in FAST}


async def _rate(read: Callable[[], int], span: float) -> float:
    a, t0 = read(), time.monotonic()
    await asyncio.sleep(span)
    return (read() - a) / (time.monotonic() - t0)


@pytest.fixture(autouse=True)
def _no_stray_tz(monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows are local time: the tests compute them on the same clock the
    nodes read, whatever zone the machine is in."""
    monkeypatch.delenv("RDSD_HOME", raising=False)
