"""Routes and what relays may claim: a node reached through a live relay
stays there, a relay's job or announcement reaches only its own subtree, and
pushing work is one pass over it whatever the number of children."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from rdsd.domain import HelloPurpose, IncomingJob, JobType, Role
from rdsd.errors import AdminError
from rdsd.parent.downlinks import Child
from tests.helpers import (
    Deployment,
    enroll_node,
    make_payload_dir,
    running,
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


async def test_dispatch_is_one_pass_over_the_work(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With many children, dispatch reads the routes once, not once per
    child and destination (which made it quadratic)."""
    with deployment.admin() as admin:
        src = make_payload_dir(deployment.root / "p", size=10)
        pid = admin.add_package(src, "tool", "1.0")
        names = [f"c{i:04d}" for i in range(300)]
        for n in names:
            admin.db.enroll(n, "client")
        job = admin.create_job("install", pid, names)
    async with running(deployment.server) as (server,):
        downlinks = server.downlinks
        assert downlinks is not None

        class Idle:  # a live-looking session that is never written to
            closed = False
            peer = type("Peer", (), {"role": Role.CLIENT, "name": ""})()

        for n in names:  # every child connected and already told of the job
            child = Child(Idle(), HelloPurpose.SESSION)  # type: ignore[arg-type]
            child.pushed.add((job, n, 0))
            downlinks.children[n] = child
        lookups = {"node": 0, "routes": 0}
        for name in lookups:
            original = getattr(server.db, name)

            def counted(*a: object, _name: str = name, _orig: object = original) -> object:
                lookups[_name] += 1
                return _orig(*a)  # type: ignore[operator]

            monkeypatch.setattr(server.db, name, counted)
        await downlinks.dispatch()
        downlinks.children.clear()
    assert lookups == {"node": 0, "routes": 1}
