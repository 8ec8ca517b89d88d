"""Regression tests for failure modes found in review: a link left deaf by a
failed fetch, relays claiming or announcing what is not theirs, a revoked
name coming back, a cancel reopened by a late report, and dispatch cost."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from protocol import Report
from rdsd import store as store_mod
from rdsd.admin import AdminError, enroll
from rdsd.config import Role
from rdsd.downlinks import Child

from .helpers import Deployment, make_payload_dir, running, wait_state

DONE = {"installed", "failed"}


async def test_failed_fetch_with_a_full_queue_leaves_the_link_working(
    deployment: Deployment, tmp_path: Path, install_out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow disk fills the fetch queue, then a write fails: the session's
    reader must not stay blocked on that queue, so the next job still arrives."""
    big = make_payload_dir(tmp_path / "big", size=24 * 1024 * 1024)
    small = make_payload_dir(tmp_path / "small", size=1000)
    with deployment.admin() as admin:
        p_big = admin.add_package(big, "big", "1.0", install="sh install.sh")
        p_small = admin.add_package(small, "small", "1.0", install="sh install.sh")
    original = store_mod.Download._write

    def slow_then_full(self: store_mod.Download, index: int, offset: int, data: bytes) -> None:
        time.sleep(0.2)
        if self.manifest.name == "big" and index == 2:
            self._broken = True
            raise store_mod.DiskFull("simulated: no space left on device")
        original(self, index, offset, data)

    monkeypatch.setattr(store_mod.Download, "_write", slow_then_full)
    async with running(deployment.server) as (server,):
        cfg = deployment.add_node("client1", Role.CLIENT, server.address)
        async with running(cfg):
            with deployment.admin() as admin:
                j1 = admin.create_job("install", p_big, ["client1"])
                assert await wait_state(admin, j1, "client1", DONE, 20) == "failed"
                j2 = admin.create_job("install", p_small, ["client1"])
                assert await wait_state(admin, j2, "client1", DONE, 15) == "installed"


async def test_revoked_name_cannot_be_enrolled_again(deployment: Deployment) -> None:
    enroll(deployment.server.home, "laptop", "client", deployment.root / "a.bundle")
    with deployment.admin() as admin:
        admin.revoke("laptop")
    with pytest.raises(AdminError, match="revoked"):
        enroll(deployment.server.home, "laptop", "client", deployment.root / "b.bundle")
    with deployment.admin() as admin:
        row = admin.db.node("laptop")
        assert row is not None and row.revoked


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
                    await _wait_via(admin, "client1", "relay1")
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
                    await _wait_via(admin, "client1", "relay1")
                with deployment.admin("relay1") as radmin:
                    with pytest.raises(AdminError, match="not behind this relay"):
                        radmin.create_job("install", pid, ["ghost"])
                    good = radmin.create_job("install", pid, ["client1"])
                with deployment.admin() as admin:
                    async with asyncio.timeout(10):  # the relay's announcement arrives
                        while admin.db.job(good) is None:  # noqa: ASYNC110
                            await asyncio.sleep(0.05)
                    assert await wait_state(admin, good, "client1", DONE, 15) == "installed"


async def test_announcement_cannot_rewrite_a_server_job(
    deployment: Deployment, package_src: Path
) -> None:
    """A relay announcing an existing job's id is refused; the job stays."""
    with deployment.admin() as admin:
        pid = admin.add_package(package_src, "tool", "1.0")
        enroll(deployment.server.home, "client1", "client", deployment.root / "c.bundle")
        job = admin.create_job("install", pid, ["client1"], at=time.time() + 3600)
        before = admin.db.job(job)
        # The same call the server makes for an announcement it accepted.
        admin.db.receive_job(job, "offer", pid, ["client1"], b"other", 4e9, "relay1")
        assert admin.db.job(job) == before


async def test_late_progress_report_does_not_reopen_a_cancel(deployment: Deployment) -> None:
    with deployment.admin() as admin:
        src = make_payload_dir(deployment.root / "p", size=10)
        pid = admin.add_package(src, "tool", "1.0")
        enroll(deployment.server.home, "client1", "client", deployment.root / "c.bundle")
        job = admin.create_job("install", pid, ["client1"])
        admin.cancel(job)
        late = Report(report_id="client1:7", job=job, node="client1", state="transferring", seq=7)
        assert not admin.db.apply_report(late, forward=False)
        assert admin.job_status(job)["destinations"][0]["state"] == "cancelled"
        final = Report(report_id="client1:8", job=job, node="client1", state="installed", seq=8)
        assert admin.db.apply_report(final, forward=False)  # what really happened wins


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
            peer = type("Peer", (), {"role": "client", "name": ""})()

        for n in names:  # every child connected and already told of the job
            child = Child(Idle(), "session")  # type: ignore[arg-type]
            child.notified.add((job, n, 0))
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


async def _wait_via(admin: object, node: str, via: str, timeout: float = 10) -> None:
    from rdsd.admin import Admin

    assert isinstance(admin, Admin)
    async with asyncio.timeout(timeout):
        while (row := admin.db.node(node)) is None or row.via != via:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def test_expired_offer_is_reported_as_such(
    deployment: Deployment, tmp_path: Path, install_out: Path
) -> None:
    src = make_payload_dir(tmp_path / "offer", size=1000)
    with deployment.admin() as admin:
        pid = admin.add_package(src, "gift", "1.0", install="sh install.sh", keep=2)
    async with running(deployment.server) as (server,):
        cfg = deployment.add_node("client1", Role.CLIENT, server.address)
        async with running(cfg) as (client,):
            with deployment.admin() as admin:
                job = admin.create_job("offer", pid, ["client1"])
                assert await wait_state(admin, job, "client1", {"offered", "failed"}) == "offered"
                await asyncio.sleep(2.2)
                assert client.sweep() == [pid]
                assert await wait_state(admin, job, "client1", {"failed"}, 10) == "failed"
                detail = admin.job_status(job)["destinations"][0]["detail"]
                assert "expired" in detail


async def test_cleanup_spares_files_another_process_is_writing(deployment: Deployment) -> None:
    """A command's store clean-up must not delete what a live process writes."""
    with deployment.admin() as admin:
        store = admin.store
        store.prepare()
        live = store.root / f".x-1.0.pkg.tmp-{os.getpid()}"
        dead = store.root / ".y-1.0.pkg.tmp-999999999"
        fresh = store.root / "z-1.0.pkg"  # just renamed, envelope not yet written
        for path in (live, dead, fresh):
            path.write_bytes(b"data")
        store.prepare()
        assert live.exists() and fresh.exists()
        assert not dead.exists()
