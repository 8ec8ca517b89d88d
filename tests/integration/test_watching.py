"""Watching the work, in one event loop over real TLS on 127.0.0.1: presence
of nodes at any depth, the parent's log of failed TLS handshakes, progress
with rate and ETA in job status, and job list filters in SQL."""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from protocol import MAX_PRESENCE_BATCH, Presence, Report
from rdsd.admin.ops import Admin
from rdsd.child.uplink import software
from rdsd.config import HomePaths
from rdsd.domain import DestState, JobType, Role, parse_progress, progress_detail
from rdsd.node.housekeeping import presence_batches
from rdsd.parent.downlinks import HANDSHAKE_LOG_INTERVAL, HandshakeLog
from rdsd.security import client_context
from tests.adversarial.trust import still_open
from tests.helpers import (
    Deployment,
    RawChild,
    enroll_node,
    running,
    wait_child,
    wait_routed,
    wait_until,
)


def nodes_of(admin: Admin) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in admin.nodes()}


def online(admin: Admin, name: str) -> bool:
    return bool(nodes_of(admin).get(name, {}).get("online"))


async def test_presence_online_and_offline_through_a_relay(deployment: Deployment) -> None:
    """A client behind a relay shows online on the server with the relay as
    its parent and its version; it goes offline when it stops, and so does
    everything behind a relay when the relay stops."""
    async with running(deployment.server) as (server,):
        relay_cfg = deployment.add_node("relay1", Role.RELAY, server.address)
        direct_cfg = deployment.add_node("client2", Role.CLIENT, server.address)
        async with running(relay_cfg, direct_cfg) as (relay, _direct):
            c1 = deployment.add_node("client1", Role.CLIENT, relay.address)
            with deployment.admin() as admin:
                async with running(c1):
                    await wait_until(lambda: online(admin, "client1"), 10, 0.05, "client1 online")
                    nodes = nodes_of(admin)
                    assert nodes["client1"]["via"] == "relay1"
                    assert nodes["client1"]["route"] == "relay1"
                    assert nodes["client1"]["version"] == software()
                    assert software().startswith("rdsd/")
                    # A direct child is connected through the server itself.
                    assert nodes["relay1"]["online"] and nodes["relay1"]["via"] == "server"
                    assert nodes["client2"]["online"] and nodes["client2"]["via"] == "server"
                    assert nodes["relay1"]["version"] == software()
                    assert nodes["client1"]["connected_since"] is not None
                    with deployment.admin("relay1") as radmin:
                        assert nodes_of(radmin)["client1"]["via"] == "relay1"
                stopped = time.monotonic()
                await wait_until(lambda: not online(admin, "client1"), 30, 0.05, "client1 offline")
                assert time.monotonic() - stopped < 30
                gone = nodes_of(admin)["client1"]
                assert gone["via"] == "relay1" and gone["version"] == software()
                assert gone["last_seen"] is not None and gone["connected_since"] is None
                # Back again, then the relay goes: its whole subtree is offline.
                async with running(c1):
                    await wait_until(lambda: online(admin, "client1"), 10, 0.05, "client1 back")
                    await relay.stop()
                    await wait_until(
                        lambda: not online(admin, "client1") and not online(admin, "relay1"),
                        30,
                        0.05,
                        "client1 and relay1 offline after the relay stopped",
                    )
                    assert online(admin, "client2")


async def test_presence_two_relays_deep(deployment: Deployment) -> None:
    """server -> relay1 -> relay2 -> client1: the server sees client1 online
    via relay2 (its own parent), reached through relay1."""
    async with running(deployment.server) as (server,):
        r1 = deployment.add_node("relay1", Role.RELAY, server.address)
        async with running(r1) as (relay1,):
            r2 = deployment.add_node("relay2", Role.RELAY, relay1.address)
            async with running(r2) as (relay2,):
                c1 = deployment.add_node("client1", Role.CLIENT, relay2.address)
                with deployment.admin() as admin:
                    async with running(c1):
                        await wait_until(
                            lambda: online(admin, "client1"), 15, 0.05, "client1 online"
                        )
                        n = nodes_of(admin)
                        assert (n["client1"]["via"], n["client1"]["route"]) == ("relay2", "relay1")
                        assert (n["relay2"]["via"], n["relay2"]["route"]) == ("relay1", "relay1")
                    await wait_until(
                        lambda: not online(admin, "client1"), 30, 0.05, "client1 offline"
                    )
                    assert online(admin, "relay2")


async def test_presence_from_a_relay_counts_only_its_subtree(deployment: Deployment) -> None:
    """A relay cannot put nodes online that are not behind it, and a client
    may not send PRESENCE at all."""
    async with running(deployment.server) as (server,):
        enroll_node(deployment, "client9", Role.CLIENT)
        relay_cfg = deployment.add_node("relay1", Role.RELAY, server.address)
        client_cfg = deployment.add_node("client1", Role.CLIENT, server.address)
        raw = await RawChild.connect(server.address, relay_cfg.home)
        await raw.handshake("relay1", role="relay", purpose="session")
        with deployment.admin() as admin:
            await wait_until(lambda: online(admin, "relay1"), 10, 0.05, "relay1 online")
            # Claims signed with the relay's own key, not the nodes'.
            await raw.send(Presence(online={"client9": raw.attach("client9")}, reset=True))
            await raw.send(Presence(online={"client1": raw.attach("client1")}))
            await asyncio.sleep(0.3)
            assert not online(admin, "client9")
            assert not online(admin, "client1")
            await still_open(raw)
        await raw.close()
        liar = await RawChild.connect(server.address, client_cfg.home)
        await liar.handshake("client1", role="client", purpose="session")
        await liar.send(Presence(online={"client9": liar.attach("client9")}))
        answer = await liar.recv()
        assert getattr(answer, "reason", ""), answer
        await liar.close()


def test_presence_batches_stay_within_the_cap() -> None:
    online = [(f"c{i}", (b"claim", "rdsd/0.1.0")) for i in range(MAX_PRESENCE_BATCH + 5)]
    batches = presence_batches(online, ["gone1", "gone2"], reset=True)
    assert [b.reset for b in batches] == [True, False]
    assert all(len(b.online) + len(b.offline) <= MAX_PRESENCE_BATCH for b in batches)
    assert sum(len(b.online) for b in batches) == len(online)
    assert batches[-1].offline == ["gone1", "gone2"]
    assert presence_batches([], [], reset=True) == [Presence(reset=True)]
    assert presence_batches([], [], reset=False) == []


async def test_failed_tls_handshake_is_logged_with_the_peer_address(
    deployment: Deployment, tmp_path: Path
) -> None:
    """A peer that does not speak TLS, and one with a certificate of another
    deployment, each give one warning naming the peer address and reason."""
    from rdsd.admin import init_server

    other = tmp_path / "other"
    init_server(other, name="other", listen=("127.0.0.1", 0))
    async with running(deployment.server) as (server,):
        host, port = server.address
        with capture_logs() as logs:
            _, writer = await asyncio.open_connection(host, port)
            local = "{}:{}".format(*writer.get_extra_info("sockname")[:2])
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            await writer.drain()
            await wait_until(
                lambda: any(e["event"] == "child.tls_failed" for e in logs), 10, 0.02, "a log line"
            )
            writer.close()
            failed = [e for e in logs if e["event"] == "child.tls_failed"]
            assert len(failed) == 1
            assert failed[0]["peer_address"] == local
            assert failed[0]["log_level"] == "warning"
            assert "HTTP" in failed[0]["reason"].upper(), failed[0]
            # The same host again within the interval: held back, counted.
            _, w2 = await asyncio.open_connection(host, port)
            w2.write(b"\x00" * 64)
            await w2.drain()
            await asyncio.sleep(0.3)
            w2.close()
            assert len([e for e in logs if e["event"] == "child.tls_failed"]) == 1
    assert HandshakeLog().admit("h", 0.0) == 0
    limiter = HandshakeLog()
    assert limiter.admit("h", 0.0) == 0
    assert limiter.admit("h", 1.0) is None
    assert limiter.admit("h", HANDSHAKE_LOG_INTERVAL + 0.5) == 1
    # A certificate from another deployment's CA.
    paths = deployment.server.paths
    theirs = HomePaths(other)
    ctx = client_context(paths.ca_cert, theirs.cert, theirs.key)
    async with running(deployment.server) as (server,):
        with capture_logs() as logs:
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                r, _ = await asyncio.open_connection(*server.address, ssl=ctx)
                await r.read(1)
                raise ConnectionError("closed by the server")
            await wait_until(
                lambda: any(e["event"] == "child.tls_failed" for e in logs), 10, 0.02, "a log line"
            )
            line = next(e for e in logs if e["event"] == "child.tls_failed")
            assert line["peer_address"].startswith("127.0.0.1:")
            assert line["reason"]


def test_progress_detail_round_trip() -> None:
    detail = progress_detail(1258291, 3145728)
    assert detail == "39% (1.2 of 3.0 MiB) [bytes 1258291/3145728]"
    assert parse_progress(detail) == (1258291, 3145728)
    assert parse_progress("37% (1.2 of 3.0 MiB)") is None
    assert parse_progress("[bytes 5/4]") is None


async def test_status_shows_bytes_rate_and_eta_of_transferring_destinations(
    deployment: Deployment, package_src: Path
) -> None:
    """Progress reports from below become bytes, rate and ETA in status;
    other states show none."""
    with deployment.admin() as admin:
        pid = admin.add_package(package_src, "tool", "1.0", install="true")
    enroll_node(deployment, "client1", Role.CLIENT)
    enroll_node(deployment, "client2", Role.CLIENT)
    with deployment.admin() as admin:
        admin.db.upsert_node("client1", "client", via="client1")
        admin.db.upsert_node("client2", "client", via="client2")
        job = admin.create_job(JobType.INSTALL, pid, ["client1", "client2"])
        t0 = time.time()
        for seq, (done, at) in enumerate(((1_000_000, t0), (3_000_000, t0 + 2.0)), 1):
            rep = Report(
                report_id=f"client1:{seq}",
                job=job,
                node="client1",
                state=DestState.TRANSFERRING,
                seq=seq,
                detail=progress_detail(done, 5_000_000),
                time=at,
                origin="client1",
            )
            admin.db.apply_report(rep, forward=False)
        status = {d["node"]: d for d in admin.job_status(job)["destinations"]}
    moving = status["client1"]
    assert (moving["bytes_done"], moving["bytes_total"]) == (3_000_000, 5_000_000)
    assert moving["rate"] == pytest.approx(1_000_000.0)
    assert moving["eta"] == pytest.approx(2.0)
    assert status["client2"]["rate"] is None and status["client2"]["bytes_total"] is None


async def test_real_transfer_reports_progress_up_to_the_server(
    deployment: Deployment, tmp_path: Path
) -> None:
    """A slow-ish real transfer through a relay: the server's database gets
    progress points with the machine-readable suffix from the client."""
    from tests.helpers import make_payload_dir

    src = make_payload_dir(tmp_path / "big", size=24 * 1024 * 1024)
    with deployment.admin() as admin:
        pid = admin.add_package(src, "big", "1.0", install="true")
    server_cfg = deployment.server
    async with running(server_cfg) as (server,):
        relay_cfg = deployment.add_node("relay1", Role.RELAY, server.address)
        async with running(relay_cfg) as (relay,):
            c1 = deployment.add_node("client1", Role.CLIENT, relay.address)
            from dataclasses import replace

            c1 = replace(c1, progress_interval=0.02)
            async with running(c1):
                with deployment.admin() as admin:
                    await wait_routed(admin, "client1", "relay1")
                    seen: list[str] = []
                    job = admin.create_job(JobType.INSTALL, pid, ["client1"])

                    def look() -> bool:
                        dest = admin.db.dest(job, "client1")
                        if dest is not None and parse_progress(dest.detail):
                            seen.append(dest.detail)
                        return dest is not None and dest.final

                    await wait_until(look, 60, 0.01, "job finished")
                    assert admin.db.dest(job, "client1").state == "installed"  # type: ignore[union-attr]
    if not seen:
        pytest.skip("the transfer finished before a progress report was taken")
    assert all(parse_progress(d) is not None for d in seen)


async def test_job_list_filters_in_sql(deployment: Deployment, package_src: Path) -> None:
    with deployment.admin() as admin:
        pid = admin.add_package(package_src, "tool", "1.0", install="true")
        for n in ("c1", "c2", "c3"):
            enroll_node(deployment, n, Role.CLIENT)
        running_job = admin.create_job(JobType.INSTALL, pid, ["c1", "c2"])
        failed_job = admin.create_job(JobType.INSTALL, pid, ["c1", "c2"])
        done_job = admin.create_job(JobType.INSTALL, pid, ["c3"])
        admin.db.change(failed_job, "c1", DestState.FAILED, "boom", "server", report=False)
        for job, node in ((failed_job, "c2"), (done_job, "c3")):
            admin.db.change(job, node, DestState.INSTALLING, "", "server", report=False)
            admin.db.change(job, node, DestState.INSTALLED, "", "server", report=False)
        # An old job: created two days ago.
        old_job = admin.create_job(JobType.INSTALL, pid, ["c3"])
        admin.db._db.execute("UPDATE jobs SET created = created - 2 * 86400 WHERE id=?", (old_job,))

        def ids(**kw: Any) -> list[str]:
            return [j["id"] for j in admin.jobs(**kw)]

        assert set(ids()) == {running_job, failed_job, done_job, old_job}
        assert set(ids(state="running")) == {running_job, old_job}
        assert ids(state="failed") == [failed_job]
        assert set(ids(state="done")) == {failed_job, done_job}
        assert set(ids(since=86400)) == {running_job, failed_job, done_job}
        assert ids(state="running", since=86400) == [running_job]
        newest_two = ids(limit=2)
        assert len(newest_two) == 2 and old_job not in newest_two
        assert ids(limit=1) == [ids()[-1]]
        failed = next(j for j in admin.jobs(state="failed"))
        assert failed["states"] == {"failed": 1, "installed": 1} and failed["done"] is True
        from rdsd.errors import AdminError

        with pytest.raises(AdminError):
            admin.jobs(state="bogus")
        with pytest.raises(AdminError):
            admin.jobs(limit=0)


async def test_uplink_logs_name_the_parent_address(deployment: Deployment) -> None:
    """A connection failure names the parent's address and the reason."""
    cfg = deployment.add_node("client1", Role.CLIENT, ("127.0.0.1", 1))
    with capture_logs() as logs:
        async with running(cfg):
            await wait_until(
                lambda: any(e["event"] == "uplink.connect_failed" for e in logs),
                10,
                0.02,
                "connect_failed",
            )
    line = next(e for e in logs if e["event"] == "uplink.connect_failed")
    assert line["parent_address"] == "127.0.0.1:1"
    assert line["reason"]


async def test_clean_stop_of_a_connected_pair_logs_no_warning(deployment: Deployment) -> None:
    """Stopping a client and then its server: one node.stopped each and no
    warning or error from either."""
    async with running(deployment.server) as (server,):
        cfg = deployment.add_node("client1", Role.CLIENT, server.address)
        with capture_logs() as logs:
            async with running(cfg) as (client,):
                await wait_child(server, "client1")
                assert client.uplink is not None
            await wait_child(server, "client1", present=False)
    bad = [e for e in logs if e["log_level"] in ("warning", "error", "critical")]
    assert bad == [], bad
    assert [e["event"] for e in logs].count("node.stopped") == 1
