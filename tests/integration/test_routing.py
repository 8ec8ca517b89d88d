"""Routes and what relays may claim: a node reached through a live relay
stays there, a relay's job or announcement reaches only its own subtree, and
pushing work is one pass over it whatever the number of children."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from protocol import Fetch, Message, MessageType, Topology
from rdsd.domain import HelloPurpose, IncomingJob, JobType, Role
from rdsd.errors import AdminError
from rdsd.net.session import WRITE_BUFFER, WRITE_SLICE
from rdsd.parent.downlinks import Child
from rdsd.parent.handlers import ChildHandlers
from tests.helpers import (
    Deployment,
    RawChild,
    children,
    enroll_node,
    make_payload_dir,
    routed,
    running,
    wait_child,
    wait_routed,
    wait_state,
    wait_until,
)

DONE = {"installed", "failed"}


async def test_relay_cannot_pull_a_node_from_another_live_relay(
    deployment: Deployment, package_src: Path, install_out: Path
) -> None:
    with deployment.admin() as admin:
        pid = admin.add_package(package_src, "tool", "1.0", install="sh install.sh")
    async with running(deployment.server) as (server,):
        r1 = deployment.add_node("relay1", Role.RELAY, server.address)
        r2 = deployment.add_node("relay2", Role.RELAY, server.address)
        async with running(r1, r2) as (relay1, relay2):
            c1 = deployment.add_node("client1", Role.CLIENT, relay1.address)
            async with running(c1):
                with deployment.admin() as admin:
                    await wait_routed(admin, "client1", "relay1")
                    # relay2 claims client1 as its own.
                    assert relay2.uplink is not None and relay2.uplink.session is not None
                    relay2.db.upsert_node("client1", "client", via="client1")
                    relay2._topology_changed()
                    await asyncio.sleep(0.5)
                    row = admin.db.node("client1")
                    assert row is not None and row.via == "relay1"
                    job = admin.create_job("install", pid, ["client1"])
                    assert await wait_state(admin, job, "client1", DONE, 15) == "installed"
    assert (install_out / "client1" / "env.txt").exists()


async def test_relay_job_for_a_node_not_behind_it_is_refused(
    deployment: Deployment, package_src: Path, install_out: Path
) -> None:
    with deployment.admin() as admin:
        pid = admin.add_package(package_src, "tool", "1.0", install="sh install.sh")
    async with running(deployment.server) as (server,):
        relay_cfg = deployment.add_node("relay1", Role.RELAY, server.address)
        async with running(relay_cfg) as (relay,):
            c1 = deployment.add_node("client1", Role.CLIENT, relay.address)
            async with running(c1):
                with deployment.admin() as admin:
                    j0 = admin.create_job("transfer", pid, ["relay1"])
                    assert await wait_state(admin, j0, "relay1", {"stored", "failed"}) == "stored"
                    await wait_routed(admin, "client1", "relay1")
                with deployment.admin("relay1") as radmin:
                    with pytest.raises(AdminError, match="not behind this relay"):
                        radmin.create_job("install", pid, ["ghost"])
                    good = radmin.create_job("install", pid, ["client1"])
                with deployment.admin() as admin:
                    await wait_until(lambda: admin.db.job(good) is not None, 10, what="announce")
                    assert await wait_state(admin, good, "client1", DONE, 15) == "installed"


async def test_announcement_cannot_rewrite_a_server_job(
    deployment: Deployment, package_src: Path
) -> None:
    """A relay announcing an existing job's id is refused; the job stays."""
    with deployment.admin() as admin:
        pid = admin.add_package(package_src, "tool", "1.0")
        enroll_node(deployment, "client1", Role.CLIENT)
        job = admin.create_job("install", pid, ["client1"], at=time.time() + 3600)
        before = admin.db.job(job)
        # The same call the server makes for an announcement it accepted.
        admin.db.receive_job(
            IncomingJob(job, JobType.OFFER, pid, ["client1"], b"other", 4e9, "relay1")
        )
        assert admin.db.job(job) == before


async def test_a_pass_routes_only_what_changed(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With many children connected, a pass routes each changed job once,
    reaches each child once, and a pass with nothing changed routes nothing:
    the work per event is what the event changed, not the size of the fleet."""
    with deployment.admin() as admin:
        src = make_payload_dir(deployment.root / "p", size=10)
        pid = admin.add_package(src, "tool", "1.0")
        names = [f"c{i:04d}" for i in range(300)]
        for n in names:
            admin.db.enroll(n, "client")
    async with running(deployment.server) as (server,):
        downlinks = server.downlinks
        assert downlinks is not None
        await downlinks.push_changes()  # everything so far is routed

        class Idle:  # a live-looking session that records what it is sent
            closed = False

            def __init__(self, name: str) -> None:
                self.peer = type("Peer", (), {"role": Role.CLIENT, "name": name})()
                self.sent: list[object] = []

            def send_nowait(self, msg: object) -> None:
                self.sent.append(msg)

        sessions = {n: Idle(n) for n in names}
        for n in names:
            downlinks.children[n] = Child(sessions[n], HelloPurpose.SESSION)  # type: ignore[arg-type]
        routed = []
        original = server.db.job_routes

        def counted(jid: str) -> object:
            routed.append(jid)
            return original(jid)

        monkeypatch.setattr(server.db, "job_routes", counted)
        try:
            with deployment.admin() as admin:
                job = admin.create_job("install", pid, names)
            await downlinks.push_changes()
            assert routed == [job]
            assert all(len(sessions[n].sent) == 1 for n in names)
            await downlinks.push_changes()  # nothing changed
            assert routed == [job]
            assert all(len(sessions[n].sent) == 1 for n in names)
            with deployment.admin() as admin:
                admin.cancel(job)
            await downlinks.push_changes()
            assert routed == [job, job]
            assert all(len(sessions[n].sent) == 2 for n in names)  # one JOB_CANCEL each
        finally:
            downlinks.children.clear()


async def test_a_relay_tells_its_parent_only_what_changed_below_it(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Children connecting one after another reach the server as small
    deltas, not as the whole subtree again each time; a node that leaves the
    relay's subtree is removed by name."""
    heard: list[Topology] = []
    original = ChildHandlers.TABLE[MessageType.TOPOLOGY]

    async def recording(self: ChildHandlers, child: Child, msg: Message) -> None:
        assert isinstance(msg, Topology)
        heard.append(msg)
        await original(self, child, msg)

    monkeypatch.setitem(ChildHandlers.TABLE, MessageType.TOPOLOGY, recording)
    async with running(deployment.server) as (server,):
        relay_cfg = deployment.add_node("relay1", Role.RELAY, server.address)
        async with running(relay_cfg) as (relay,):
            names = [f"c{i}" for i in range(12)]
            cfgs = [deployment.add_node(n, Role.CLIENT, relay.address) for n in names]
            with deployment.admin() as admin:
                for cfg in cfgs:  # one at a time, each routed before the next
                    async with running(cfg):
                        await wait_routed(admin, cfg.name, "relay1")
                named = sum(len(t.nodes) + len(t.removed) for t in heard)
                # Each child is told about once, not the whole subtree again
                # each time (12 + 11 + ... + 1 would be 78 names).
                assert named <= 2 * len(names), [len(t.nodes) for t in heard]
                assert any(not t.reset for t in heard)
                # c0 leaves the relay's subtree: the server hears it by name.
                relay.db.route_through("c0", [], keep=set())
                relay.housekeeping.topology_changed(["c0"])
                await wait_until(lambda: not routed(admin, "c0", "relay1"), 10, what="c0 gone")
                assert heard[-1].removed == ["c0"] and not heard[-1].reset
                assert all(routed(admin, n, "relay1") for n in names[1:])


async def test_a_stalled_child_does_not_delay_another_childs_notice(
    deployment: Deployment, tmp_path: Path
) -> None:
    """A child that reads nothing (its session full with a fetch it asked
    for) does not hold up the notice of a job for it and a healthy child:
    the healthy one has it within a second."""
    big = make_payload_dir(tmp_path / "big", size=8 * 1024 * 1024)
    with deployment.admin() as admin:
        p_big = admin.add_package(big, "big", "1.0")
        p_small = admin.add_package(make_payload_dir(tmp_path / "s", size=100), "small", "1.0")
    async with running(deployment.server) as (server,):
        stalled_cfg = deployment.add_node("stalled", Role.CLIENT, server.address)
        healthy_cfg = deployment.add_node("healthy", Role.CLIENT, server.address)
        raw = await RawChild.connect(server.address, stalled_cfg.home)
        try:
            await raw.handshake("stalled", purpose="session")
            with deployment.admin() as admin:
                admin.create_job("install", p_big, ["stalled"])
            await raw.send(Fetch(fetch_id=1, package=p_big))  # and never read again
            await wait_child(server, "stalled")
            session = children(server)["stalled"].session
            await wait_until(lambda: session.writes_paused, 10, what="full")
            async with running(healthy_cfg) as (healthy,):
                await wait_child(server, "healthy")
                with deployment.admin() as admin:
                    began = time.monotonic()
                    job = admin.create_job("install", p_small, ["stalled", "healthy"])
                await wait_until(lambda: healthy.db.job(job) is not None, 5, what="the notice")
                assert time.monotonic() - began < 1.0
        finally:
            await raw.close()


async def test_a_parent_serving_children_that_read_nothing_holds_a_slice_for_each(
    deployment: Deployment, tmp_path: Path
) -> None:
    """Fan-out memory: children fetch a package at once and none of them
    reads. Each serve waits for its child once the session's TLS layer
    holds WRITE_BUFFER that the socket did not take, so what the parent
    holds in transport buffers stays within a slice per child however large
    the package (it was up to 2 MiB per child, and the TLS layer's outgoing
    buffer keeps the most it ever held for the connection's life)."""
    big = make_payload_dir(tmp_path / "big", size=8 * 1024 * 1024)
    with deployment.admin() as admin:
        p_big = admin.add_package(big, "big", "1.0")
    names = [f"c{i}" for i in range(6)]
    async with running(deployment.server) as (server,):
        cfgs = [deployment.add_node(n, Role.CLIENT, server.address) for n in names]
        raws: list[RawChild] = []
        try:
            for cfg in cfgs:
                raw = await RawChild.connect(server.address, cfg.home)
                raws.append(raw)
                await raw.handshake(cfg.name, purpose="session")
                await wait_child(server, cfg.name)
            with deployment.admin() as admin:
                admin.create_job("install", p_big, names)
            for raw in raws:
                await raw.send(Fetch(fetch_id=1, package=p_big))  # and never read again
            kids = [children(server)[n] for n in names]
            # A slice, its frame header and what was queued before it.
            bound = WRITE_BUFFER + WRITE_SLICE + 4096

            def held() -> list[int]:
                return [
                    -1 if k.session.closed else k.session.transport.get_write_buffer_size()
                    for k in kids
                ]

            await wait_until(
                lambda: (
                    all(k.session.writes_paused for k in kids)
                    or max(held()) > bound
                    or min(held()) < 0
                ),
                20,
                what="every serve waiting",
            )
            assert min(held()) >= 0 and max(held()) <= bound, held()
            # The serves wait for their children; none ended.
            assert all(k.serving for k in kids)
        finally:
            for raw in raws:
                await raw.close()


async def test_fetches_beyond_the_serve_slots_wait_their_turn(
    deployment: Deployment, tmp_path: Path, install_out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A parent serves a bounded number of fetches at once (what fan-out to
    many children costs in memory); the others wait for their first chunk
    and are served in turn, and every child installs."""
    import rdsd.net.transfer as transfer_mod
    import rdsd.parent.handlers as handlers_mod

    src = make_payload_dir(tmp_path / "p", size=3 * 1024 * 1024)
    with deployment.admin() as admin:
        pid = admin.add_package(src, "tool", "1.0", install="sh install.sh")
    running_now = peak = 0
    original = transfer_mod.serve_fetch  # what the parent handlers call

    async def counted(*args: Any, **kwargs: Any) -> None:
        nonlocal running_now, peak
        running_now += 1
        peak = max(peak, running_now)
        try:
            await original(*args, **kwargs)
        finally:
            running_now -= 1

    monkeypatch.setattr(handlers_mod, "serve_fetch", counted)
    async with running(deployment.server) as (server,):
        assert server.downlinks is not None
        server.downlinks.serve_slots = asyncio.Semaphore(1)
        names = ["c1", "c2", "c3"]
        cfgs = [deployment.add_node(n, Role.CLIENT, server.address) for n in names]
        async with running(*cfgs):
            with deployment.admin() as admin:
                for n in names:
                    await wait_routed(admin, n, n)
                job = admin.create_job("install", pid, names)
                for n in names:
                    assert await wait_state(admin, job, n, DONE, 30) == "installed"
    assert peak == 1
