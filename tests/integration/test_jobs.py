"""Job types, relay caching and job control, end to end over real TLS sockets.

What DESIGN.md §2-§3 and §5 promise an operator about jobs: a transfer job
fills a relay's cache (and the server knows what each relay holds), a relay
fetches a package once for all its children and serves later jobs from its
cache, packages expire from relays and can be re-kept, offers wait for a
local user (``rdsft offers`` / ``rdsft install``), relays may make install
and offer jobs of their own, groups and execution times, retry and cancel,
and the inventory ``rdsd nodes --json`` shows.

Every node runs in this event loop on 127.0.0.1 port 0 (see helpers.py);
the CLI and ``rdsft`` run as subprocesses, started with asyncio so the
in-process nodes keep serving while they run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import pytest

import rdsd.net.transfer as transfer_mod
import rdsd.parent.handlers as handlers_mod
from rdsd.admin import Admin, parse_time
from rdsd.config import iso
from rdsd.domain import Role
from rdsd.errors import AdminError
from rdsd.net.session import Session
from rdsd.node import Node
from rdsd.state import JobDB
from tests.helpers import (
    Deployment,
    make_payload_dir,
    rdsd_cmd,
    rdsft_cmd,
    running,
    traffic,
    wait_routed,
    wait_state,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]
KIB = 1024
SMALL = 64 * KIB  # "no package bytes": job notices, acks and pings only
DONE = {"installed", "failed"}
DAY = 86400

# Counts its runs per node and job; on client1 it fails the first time it
# runs for a given job (it leaves a marker for the second run).
FLAKY_SCRIPT = """#!/bin/sh
echo "$RDSD_JOB" >> "$RDSD_TEST_OUT/runs-$RDSD_NODE.txt"
marker="$RDSD_TEST_OUT/marker-$RDSD_JOB-$RDSD_NODE"
if [ "$RDSD_NODE" = "client1" ] && [ ! -e "$marker" ]; then
  touch "$marker"
  echo "first run fails on purpose"
  exit 7
fi
echo "ok"
"""


# -- helpers ------------------------------------------------------------------------


async def run_cmd(argv: Sequence[str], timeout: float = 30.0) -> tuple[int, str, str]:
    """Run a command without blocking the loop the nodes run in."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=REPO,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def state_of(db: JobDB, job: str, node: str) -> str | None:
    """``node``'s state in ``job`` per one node's database; None if unknown."""
    dest = db.dest(job, node)
    return dest.state if dest is not None else None


def states(admin: Admin, job: str) -> dict[str, str]:
    return {d["node"]: d["state"] for d in admin.job_status(job)["destinations"]}


def holds(admin: Admin, node: str) -> dict[str, str | None]:
    """What the server believes ``node`` holds: package -> expiry (ISO)."""
    for n in admin.nodes():
        if n["name"] == node:
            return {h["package"]: h["expires"] for h in n["holds"]}
    return {}


def cache(home: Path) -> list[dict[str, object]]:
    with Admin(home) as radmin:
        return radmin.cache()


def runs(out: Path, node: str, job: str | None = None) -> list[str]:
    """Job ids the flaky script recorded for ``node``, one line per run."""
    path = out / f"runs-{node}.txt"
    lines = path.read_text().split() if path.exists() else []
    return [j for j in lines if job is None or j == job]


def add_flaky_package(dep: Deployment) -> str:
    src = dep.root / "src-flaky"
    src.mkdir()
    (src / "install.sh").write_text(FLAKY_SCRIPT)
    (src / "payload.bin").write_bytes(os.urandom(200_000))
    with dep.admin() as admin:
        return admin.add_package(src, "flaky", "1.0", install="sh install.sh")


def add_tool(dep: Deployment, src: Path, keep: int | None = None, version: str = "1.0") -> str:
    with dep.admin() as admin:
        if keep is None:
            return admin.add_package(src, "tool", version, install="sh install.sh")
        return admin.add_package(src, "tool", version, install="sh install.sh", keep=keep)


def server_link(server: Node) -> Session:
    """The server's live session to relay1: while it stays the same, the
    bytes counted for relay1 are that session's."""
    assert server.downlinks is not None
    return server.downlinks.children["relay1"].session


def sent(node: Node, peer: str) -> int:
    """Framed bytes ``node`` has sent to ``peer``."""
    return traffic(node).frames[peer]


def states_detail(admin: Admin, job: str, node: str) -> str:
    for d in admin.job_status(job)["destinations"]:
        if d["node"] == node:
            return str(d["detail"])
    raise AssertionError(f"{node} is not a destination of {job}")


@dataclass
class Tiers:
    server: Node
    relay: Node
    clients: dict[str, Node]
    admin: Admin


@contextlib.asynccontextmanager
async def tiers(
    dep: Deployment,
    behind: Sequence[str] = (),
    direct: Sequence[str] = (),
    **relay_overrides: object,
) -> AsyncIterator[Tiers]:
    """server -> relay1 -> ``behind``, and ``direct`` under the server, all
    running and routed; ``relay_overrides`` replace relay1's config fields."""
    async with running(dep.server) as (server,):
        rcfg = dep.add_node("relay1", Role.RELAY, server.address)
        if relay_overrides:
            rcfg = replace(rcfg, **relay_overrides)  # type: ignore[arg-type]
            dep.configs["relay1"] = rcfg
        async with running(rcfg) as (relay,):
            cfgs = [dep.add_node(n, Role.CLIENT, relay.address) for n in behind]
            cfgs += [dep.add_node(n, Role.CLIENT, server.address) for n in direct]
            async with running(*cfgs) as nodes:
                with dep.admin() as admin:
                    assert server.downlinks is not None
                    downlinks = server.downlinks
                    await wait_until(
                        lambda: "relay1" in downlinks.children, 10, what="relay1 connected"
                    )
                    for n in behind:
                        await wait_routed(admin, n, "relay1")
                    for n in direct:
                        await wait_routed(admin, n, n)
                    names = [*behind, *direct]
                    yield Tiers(server, relay, dict(zip(names, nodes, strict=True)), admin)


async def transfer(admin: Admin, pid: str, timeout: float = 10) -> str:
    job = admin.create_job("transfer", pid, ["relay1"])
    assert await wait_state(admin, job, "relay1", {"stored", "failed"}, timeout) == "stored"
    return job


# -- 1. transfer jobs fill the relay cache; later installs come from it ---------------


async def test_transfer_stores_on_relay_and_install_is_served_from_cache(
    deployment: Deployment, package_src: Path, install_out: Path
) -> None:
    pid = add_tool(deployment, package_src)
    clients = ["client1", "client2", "client3"]
    async with tiers(deployment) as t:
        admin = t.admin
        m = admin.store.manifest(pid)
        assert m is not None and m.size >= 3 * 1024 * KIB
        job = await transfer(admin, pid)
        assert "kept until" in states_detail(admin, job, "relay1")

        relay_home = deployment.configs["relay1"].home
        assert cache(relay_home) == [
            {"package": pid, "size": m.size, "expires": iso(m.added + m.keep)}
        ]
        await wait_until(
            lambda: pid in holds(admin, "relay1"), 5, what="server to learn relay1 holds it"
        )
        assert holds(admin, "relay1") == {pid: iso(m.added + m.keep)}

        cfgs = [deployment.add_node(c, Role.CLIENT, t.relay.address) for c in clients]
        async with running(*cfgs):
            for c in clients:
                await wait_routed(admin, c, "relay1")
            link = server_link(t.server)
            before = sent(t.server, "relay1")
            job2 = admin.create_job("install", pid, clients)
            for c in clients:
                assert await wait_state(admin, job2, c, DONE, 10) == "installed", states(
                    admin, job2
                )
            assert server_link(t.server) is link, "relay1 reconnected: byte count is off"
            delta = sent(t.server, "relay1") - before
    assert delta < SMALL, f"server sent {delta} bytes for an install of a cached package"
    for c in clients:
        assert (install_out / c / "payload.bin").stat().st_size == (
            package_src / "payload.bin"
        ).stat().st_size


# -- 2. a relay fetches once for all its children ---------------------------------------


async def test_relay_fetches_once_for_three_children(
    deployment: Deployment, package_src: Path, install_out: Path
) -> None:
    pid = add_tool(deployment, package_src)
    clients = ["client1", "client2", "client3"]
    async with tiers(deployment, behind=clients) as t:
        admin = t.admin
        m = admin.store.manifest(pid)
        assert m is not None
        assert t.relay.downlinks is not None
        relay_links = {c: t.relay.downlinks.children[c].session for c in clients}
        link = server_link(t.server)
        before = sent(t.server, "relay1")
        relay_before = {c: sent(t.relay, c) for c in clients}
        job = admin.create_job("install", pid, clients)
        for c in clients:
            assert await wait_state(admin, job, c, DONE, 10) == "installed", states(admin, job)
        # children only holds live sessions: read the numbers before stopping
        server_sent = sent(t.server, "relay1") - before
        relay_sent = sum(sent(t.relay, c) - relay_before[c] for c in clients)
        assert server_link(t.server) is link
        assert all(t.relay.downlinks.children[c].session is s for c, s in relay_links.items())
    print(
        f"\n[fetch once] package {m.size} bytes; server -> relay1: {server_sent} bytes "
        f"({server_sent / m.size:.3f}x); relay1 -> 3 clients: {relay_sent} bytes "
        f"({relay_sent / m.size:.3f}x)"
    )
    assert m.size <= server_sent < 1.2 * m.size
    assert relay_sent >= 3 * m.size


# -- 3. expiry ----------------------------------------------------------------------------


async def test_package_expires_from_relay_and_is_sent_again(
    deployment: Deployment, package_src: Path
) -> None:
    async with tiers(deployment, sweep_interval=0.3) as t:
        admin = t.admin
        relay_home = deployment.configs["relay1"].home
        # added only now: the two seconds start with the topology already up
        pid = admin.add_package(package_src, "tool", "1.0", install="sh install.sh", keep=2)
        m = admin.store.manifest(pid)
        assert m is not None and m.keep == 2 and m.expires == m.added + 2
        await transfer(admin, pid, timeout=m.expires - time.time())
        listed = cache(relay_home)
        assert listed == [{"package": pid, "size": m.size, "expires": iso(m.expires)}], (
            f"{time.time() - m.added:.2f}s after it was added"
        )
        await wait_until(
            lambda: pid in holds(admin, "relay1"), 1.5, what="server to learn it is held"
        )

        await wait_until(
            lambda: cache(relay_home) == [], 5, what="the relay to delete it on expiry"
        )
        assert time.time() >= m.expires, "deleted before its expiry"
        assert not t.relay.store.has(pid)
        await wait_until(
            lambda: pid not in holds(admin, "relay1"), 3, what="server to learn it is gone"
        )

        # Expired is expired: no job is made for it ...
        with pytest.raises(AdminError, match="expired at"):
            admin.create_job("transfer", pid, ["relay1"])
        assert not t.relay.store.has(pid)
        # ... until it is kept longer: then it is sent again.
        admin.keep_package(pid, 3600)
        link = server_link(t.server)
        before = sent(t.server, "relay1")
        await transfer(admin, pid)
        assert server_link(t.server) is link
        assert sent(t.server, "relay1") - before >= m.size, "an expired package must be sent again"


async def test_package_being_served_is_not_swept(deployment: Deployment, package_src: Path) -> None:
    """The sweep skips a package with an open reader (a transfer from the
    cache in progress) and deletes it once the reader is done."""
    pid = add_tool(deployment, package_src, keep=3600)
    async with tiers(deployment) as t:
        await transfer(t.admin, pid)
        store = t.relay.store
        later = time.time() + 10 * DAY  # well past the expiry
        chunks = store.chunks(pid, 0)
        try:
            offset, data = await anext(chunks)
            assert offset == 0 and data
            assert t.relay.housekeeping.sweep(now=later) == []
            assert store.has(pid)
        finally:
            await chunks.aclose()
        assert t.relay.housekeeping.sweep(now=later) == [pid]
        assert not store.has(pid)


# -- 4. a changed keep duration reaches the relay without the bytes ----------------------


async def test_keep_change_updates_relay_expiry_without_resending(
    deployment: Deployment, package_src: Path
) -> None:
    pid = add_tool(deployment, package_src)
    async with tiers(deployment) as t:
        admin = t.admin
        relay_home = deployment.configs["relay1"].home
        await transfer(admin, pid)
        old = cache(relay_home)[0]["expires"]
        info = admin.keep_package(pid, 200 * DAY)
        m = admin.store.manifest(pid)
        assert m is not None and m.keep == 200 * DAY
        assert info.expires == iso(m.added + 200 * DAY)
        assert info.expires is not None
        assert isinstance(old, str) and parse_time(info.expires) > parse_time(old)
        # relays learn it only when it is transferred again
        assert cache(relay_home)[0]["expires"] == old

        link = server_link(t.server)
        before = sent(t.server, "relay1")
        await transfer(admin, pid)
        delta = sent(t.server, "relay1") - before
        assert server_link(t.server) is link
        assert cache(relay_home) == [{"package": pid, "size": m.size, "expires": info.expires}]
        await wait_until(
            lambda: holds(admin, "relay1") == {pid: info.expires},
            5,
            what="server to see new expiry",
        )
    assert delta < SMALL, f"server re-sent {delta} bytes for a keep change"


# -- 5. no transfer jobs on a relay ------------------------------------------------------


async def test_transfer_job_cannot_be_created_on_a_relay(
    deployment: Deployment, package_src: Path
) -> None:
    pid = add_tool(deployment, package_src)
    rcfg = deployment.add_node("relay1", Role.RELAY, ("127.0.0.1", 9))
    with Admin(rcfg.home) as radmin, pytest.raises(AdminError) as err:
        radmin.create_job("transfer", pid, ["relay1"])
    assert "transfer job cannot be created on a relay" in str(err.value)

    rc, out, errtext = await run_cmd(
        [
            *rdsd_cmd(),
            "job",
            "create",
            "--type",
            "transfer",
            "--package",
            pid,
            "--to",
            "relay1",
            "--home",
            str(rcfg.home),
        ]
    )
    assert rc != 0
    assert out == ""
    lines = errtext.strip().splitlines()
    assert len(lines) == 1, errtext
    assert lines[0].startswith("rdsd: error:")
    assert "transfer job cannot be created on a relay" in lines[0]
    with Admin(rcfg.home) as radmin:
        assert radmin.jobs() == []


# -- 6. offers ------------------------------------------------------------------------------


async def test_offer_then_rdsft_offers_and_install(
    deployment: Deployment, package_src: Path, install_out: Path
) -> None:
    """client1 behind the relay gets the offer from its daemon (then stops);
    client2 directly under the server never runs a daemon: ``rdsft -a``
    fetches its offer. Both then install with ``rdsft install``."""
    pid = add_tool(deployment, package_src)
    async with tiers(deployment) as t:
        admin = t.admin
        m = admin.store.manifest(pid)
        assert m is not None
        c1 = deployment.add_node("client1", Role.CLIENT, t.relay.address)
        c2 = deployment.add_node("client2", Role.CLIENT, t.server.address)
        async with running(c1):
            await wait_routed(admin, "client1", "relay1")
            job = admin.create_job("offer", pid, ["client1", "client2"])
            assert await wait_state(admin, job, "client1", DONE | {"offered"}, 10) == "offered"
        assert not (install_out / "client1").exists(), "an offer must not install"

        rc, out, err = await run_cmd([*rdsft_cmd(), "-a", "--home", str(c2.home)])
        assert rc == 0, err
        assert f"{job} offer {pid}: offered" in out
        assert await wait_state(admin, job, "client2", DONE | {"offered"}, 5) == "offered"
        assert not (install_out / "client2").exists(), "an offer must not install"

        for cfg in (c1, c2):
            offers_cmd = [*rdsft_cmd(), "offers", "--home", str(cfg.home), "--json"]
            rc, out, err = await run_cmd(offers_cmd)
            assert rc == 0, err
            offers = json.loads(out)
            assert len(offers) == 1, offers
            offer = offers[0]
            assert offer["id"] == pid
            assert offer["name"] == "tool" and offer["version"] == "1.0"
            assert offer["size"] == m.size
            assert offer["job"] == job
            assert abs(parse_time(offer["offered"]) - time.time()) < 60

            rc, out, err = await run_cmd([*rdsft_cmd(), "install", pid, "--home", str(cfg.home)])
            assert rc == 0, (out, err)
            assert f"{pid}: installed" in out
            env = (install_out / cfg.name / "env.txt").read_text()
            assert f"node={cfg.name}" in env and f"job={job}" in env
            assert await wait_state(admin, job, cfg.name, {"installed"}, 5) == "installed"

            rc, out, err = await run_cmd(offers_cmd)
            assert rc == 0 and json.loads(out) == [], "an installed offer is no longer offered"
        nodes = {n["name"]: n for n in admin.nodes()}
        assert nodes["client1"]["installed"] == [pid]
        assert nodes["client2"]["installed"] == [pid]


# -- 7. jobs made at a relay ---------------------------------------------------------------


async def wait_known(admin: Admin, job: str, timeout: float = 10) -> None:
    await wait_until(lambda: admin.db.job(job) is not None, timeout, what=f"{job} to be known")


async def test_jobs_created_at_a_relay(
    deployment: Deployment, package_src: Path, install_out: Path
) -> None:
    pid = add_tool(deployment, package_src)
    other = add_tool(deployment, package_src, version="2.0")
    async with tiers(deployment, behind=["client1", "client2"]) as t:
        admin = t.admin
        await transfer(admin, pid)
        relay_home = deployment.configs["relay1"].home
        before = sent(t.server, "relay1")
        with Admin(relay_home) as radmin:
            rjob = radmin.create_job("install", pid, ["client1"])
            assert await wait_state(radmin, rjob, "client1", DONE, 10) == "installed"
            await wait_known(admin, rjob)
            assert await wait_state(admin, rjob, "client1", DONE, 5) == "installed"
            status = admin.job_status(rjob)
            assert status["origin"] == "relay1"
            assert (status["type"], status["package"]) == ("install", pid)
            assert [d["node"] for d in status["destinations"]] == ["client1"]
            assert (install_out / "client1" / "env.txt").exists()

            ojob = radmin.create_job("offer", pid, ["client2"])
            assert await wait_state(radmin, ojob, "client2", DONE | {"offered"}, 10) == "offered"
            await wait_known(admin, ojob)
            assert await wait_state(admin, ojob, "client2", DONE | {"offered"}, 5) == "offered"
            assert admin.job_status(ojob)["origin"] == "relay1"
            assert not (install_out / "client2").exists()

            with pytest.raises(AdminError) as err:
                radmin.create_job("install", other, ["client1"])
            assert f"no package {other!r} in this relay's cache" in str(err.value)
        assert sent(t.server, "relay1") - before < SMALL, (
            "relay jobs are served from the relay's cache"
        )


async def test_job_made_at_relay_while_server_down_reaches_server_status(
    deployment: Deployment, package_src: Path, install_out: Path
) -> None:
    """A relay-made job runs while the server is away; when the server is
    back, its status shows what happened."""
    pid = add_tool(deployment, package_src)
    async with contextlib.AsyncExitStack() as below:
        async with running(deployment.server) as (server,):
            address = server.address
            rcfg = deployment.add_node("relay1", Role.RELAY, address)
            relay = await below.enter_async_context(Node(rcfg))
            c1 = deployment.add_node("client1", Role.CLIENT, relay.address)
            await below.enter_async_context(Node(c1))
            with deployment.admin() as admin:
                await wait_routed(admin, "client1", "relay1")
                await transfer(admin, pid)
        # the server is down; the relay and its client carry on
        with Admin(rcfg.home) as radmin:
            rjob = radmin.create_job("install", pid, ["client1"])
            assert await wait_state(radmin, rjob, "client1", DONE, 10) == "installed"
        async with running(replace(deployment.server, listen=address)):
            with deployment.admin() as admin:
                await wait_known(admin, rjob)
                await wait_until(
                    lambda: state_of(admin.db, rjob, "client1") == "installed",
                    3,
                    what=lambda: (
                        f"server status of client1 (still {state_of(admin.db, rjob, 'client1')!r})"
                    ),
                )
                assert "tool-1.0" in {p for n in admin.nodes() for p in n["installed"]}


async def test_relay_job_does_not_break_relay_session_after_client_moves(
    deployment: Deployment, package_src: Path, install_out: Path
) -> None:
    """A finished job made at the relay must not be announced again on every
    new session: once its client has moved elsewhere, the server would refuse
    the stale announcement and drop the relay's session, again and again."""
    pid = add_tool(deployment, package_src)
    async with tiers(deployment) as t:
        admin = t.admin
        await transfer(admin, pid)
        c1 = deployment.add_node("client1", Role.CLIENT, t.relay.address)
        async with running(c1):
            await wait_routed(admin, "client1", "relay1")
            with Admin(deployment.configs["relay1"].home) as radmin:
                rjob = radmin.create_job("install", pid, ["client1"])
                assert await wait_state(radmin, rjob, "client1", DONE, 10) == "installed"
            await wait_known(admin, rjob)
            assert await wait_state(admin, rjob, "client1", DONE, 5) == "installed"
        # client1 moves directly under the server
        moved = deployment.reparent("client1", t.server.address)
        async with running(moved):
            await wait_routed(admin, "client1", "client1")
            # the relay's session drops and comes back (a network blip)
            assert t.server.downlinks is not None and t.relay.uplink is not None
            downlinks, uplink = t.server.downlinks, t.relay.uplink
            old = downlinks.children["relay1"].session
            old.abort("test: network blip")

            def reconnected() -> bool:
                child = downlinks.children.get("relay1")
                return child is not None and child.session is not old

            await wait_until(reconnected, 5, what="relay1 to reconnect")
            fresh = downlinks.children["relay1"].session
            await asyncio.sleep(1.0)
            child = downlinks.children.get("relay1")
            assert child is not None and child.session is fresh, (
                f"relay1's session was dropped again: {uplink.last_error!r}"
            )
        assert states(admin, rjob) == {"client1": "installed"}


# -- 8. groups --------------------------------------------------------------------------------


async def test_group_destinations(
    deployment: Deployment, package_src: Path, install_out: Path
) -> None:
    pid = add_tool(deployment, package_src)
    async with tiers(deployment, behind=["client1", "client2"], direct=["client3"]) as t:
        admin = t.admin
        admin.add_group("lab", ["client1", "client2"])
        job = admin.create_job("install", pid, ["group:lab", "client3", "client1"])
        assert sorted(states(admin, job)) == ["client1", "client2", "client3"]
        for c in ("client1", "client2", "client3"):
            assert await wait_state(admin, job, c, DONE, 10) == "installed", states(admin, job)
        with pytest.raises(AdminError) as err:
            admin.create_job("install", pid, ["group:nosuch"])
        assert "nosuch" in str(err.value)
        assert len(admin.jobs()) == 1


# -- 9. execution times -------------------------------------------------------------------------


async def test_install_waits_for_its_execution_time(
    deployment: Deployment, package_src: Path, install_out: Path
) -> None:
    pid = add_tool(deployment, package_src)
    async with tiers(deployment, behind=["client1"]) as t:
        admin = t.admin
        at = time.time() + 2
        job = admin.create_job("install", pid, ["client1"], at=at)
        status = admin.job_status(job)
        assert status["at"] == iso(at)
        while time.time() < at - 0.3:
            status = admin.job_status(job)
            assert status["at"] == iso(at)
            assert [(d["node"], d["state"]) for d in status["destinations"]] == [
                ("client1", "waiting")
            ]
            assert not (install_out / "client1").exists()
            await asyncio.sleep(0.05)
        assert await wait_state(admin, job, "client1", DONE, 8) == "installed"
        assert time.time() >= at
        assert (install_out / "client1" / "env.txt").exists()


async def test_transfer_at_t1_then_install_at_t2(
    deployment: Deployment, package_src: Path, install_out: Path
) -> None:
    """The transfer job gives the server->relay time, the install job the
    relay->client time: the relay is stored before the client hears of it."""
    pid = add_tool(deployment, package_src)
    async with tiers(deployment, behind=["client1"]) as t:
        admin = t.admin
        now = time.time()
        t1, t2 = now + 1, now + 3
        tjob = admin.create_job("transfer", pid, ["relay1"], at=t1)
        ijob = admin.create_job("install", pid, ["client1"], at=t2)
        assert await wait_state(admin, tjob, "relay1", {"stored", "failed"}, 5) == "stored"
        stored_at = time.time()
        assert stored_at >= t1
        assert stored_at < t2, "the transfer took too long for this test to tell"
        assert state_of(admin.db, ijob, "client1") == "waiting"
        assert t.clients["client1"].db.job(ijob) is None, "client notified before T2"
        assert t.relay.db.job(ijob) is None, "relay notified before T2"

        before = sent(t.server, "relay1")
        assert await wait_state(admin, ijob, "client1", DONE, 8) == "installed"
        assert time.time() >= t2
        assert sent(t.server, "relay1") - before < SMALL


# -- 10. retry and cancel ------------------------------------------------------------------------


async def test_retry_reruns_only_failed_destinations(
    deployment: Deployment, install_out: Path
) -> None:
    pid = add_flaky_package(deployment)
    async with tiers(deployment, behind=["client1"], direct=["client2"]) as t:
        admin = t.admin
        job = admin.create_job("install", pid, ["client1", "client2"])
        assert await wait_state(admin, job, "client1", DONE, 10) == "failed"
        assert await wait_state(admin, job, "client2", DONE, 10) == "installed"
        assert "exited with 7" in states_detail(admin, job, "client1")
        assert admin.retry(job) == ["client1"]
        assert await wait_state(admin, job, "client1", DONE, 10) == "installed"
        assert runs(install_out, "client1", job) == [job, job]
        assert runs(install_out, "client2", job) == [job]

        # the same through the CLI
        home = str(deployment.server.home)
        job2 = admin.create_job("install", pid, ["client1", "client2"])
        assert await wait_state(admin, job2, "client1", DONE, 10) == "failed"
        assert await wait_state(admin, job2, "client2", DONE, 10) == "installed"
        rc, out, err = await run_cmd([*rdsd_cmd(), "job", "retry", job2, "--home", home])
        assert rc == 0, err
        assert out.strip() == f"retrying {job2} on client1"
        assert await wait_state(admin, job2, "client1", DONE, 10) == "installed"
        rc, out, err = await run_cmd([*rdsd_cmd(), "job", "retry", job2, "--home", home])
        assert rc != 0
        assert "no failed destinations" in err
        await asyncio.sleep(0.3)
        assert runs(install_out, "client1", job2) == [job2, job2]
        assert runs(install_out, "client2", job2) == [job2]


async def test_cancel_before_execution_time(deployment: Deployment, install_out: Path) -> None:
    pid = add_flaky_package(deployment)
    async with tiers(deployment, behind=["client1"], direct=["client2"]) as t:
        admin = t.admin
        at = time.time() + 1.5
        job = admin.create_job("install", pid, ["client1", "client2"], at=at)
        assert sorted(admin.cancel(job)) == ["client1", "client2"]
        assert states(admin, job) == {"client1": "cancelled", "client2": "cancelled"}
        await asyncio.sleep(at + 1.0 - time.time())
        assert states(admin, job) == {"client1": "cancelled", "client2": "cancelled"}
        assert runs(install_out, "client1") == [] and runs(install_out, "client2") == []
        assert t.relay.db.job(job) is None, "nothing is sent before the execution time"
        for node in t.clients.values():
            assert state_of(node.db, job, node.cfg.name) is None


async def test_cancel_while_client_offline(deployment: Deployment, install_out: Path) -> None:
    """A job cancelled while its clients are away is not run when they come
    back: client1 behind the relay (which already has the job), client3
    directly under the server (which never sent it). Cancelled with the CLI."""
    pid = add_flaky_package(deployment)
    async with tiers(deployment) as t:
        admin = t.admin
        c1 = deployment.add_node("client1", Role.CLIENT, t.relay.address)
        c3 = deployment.add_node("client3", Role.CLIENT, t.server.address)
        async with running(c1, c3):  # once, so the server knows the routes
            await wait_routed(admin, "client1", "relay1")
            await wait_routed(admin, "client3", "client3")
        job = admin.create_job("install", pid, ["client1", "client3"])
        relay = t.relay.db
        await wait_until(
            lambda: state_of(relay, job, "client1") == "waiting", 5, what="relay has the job"
        )

        rc, out, err = await run_cmd(
            [*rdsd_cmd(), "job", "cancel", job, "--home", str(deployment.server.home)]
        )
        assert rc == 0, err
        assert out.strip() == f"cancelled {job} on client1, client3"
        assert states(admin, job) == {"client1": "cancelled", "client3": "cancelled"}
        await wait_until(
            lambda: state_of(relay, job, "client1") == "cancelled", 5, what="relay told"
        )

        async with running(c1, c3) as (n1, n3):
            await wait_routed(admin, "client1", "relay1")
            assert t.relay.downlinks is not None and t.server.downlinks is not None
            rdl, sdl = t.relay.downlinks, t.server.downlinks
            await wait_until(lambda: "client1" in rdl.children and "client3" in sdl.children, 5)
            await asyncio.sleep(1.0)
            assert state_of(n1.db, job, "client1") in (None, "cancelled")
            assert state_of(n3.db, job, "client3") in (None, "cancelled")
        assert runs(install_out, "client1") == [] and runs(install_out, "client3") == []
        assert states(admin, job) == {"client1": "cancelled", "client3": "cancelled"}


async def test_cancel_during_transfer_stops_it(
    deployment: Deployment, package_src: Path, install_out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancel is "stop what has not finished": a client that is still
    fetching when the cancel reaches it must not go on to install."""
    pid = add_tool(deployment, package_src)
    gate = asyncio.Event()
    original = transfer_mod.serve_fetch  # what the parent handlers call

    async def held_serve(*args: Any, **kwargs: Any) -> None:
        await gate.wait()  # the transfer stalls until the test lets it go
        await original(*args, **kwargs)

    monkeypatch.setattr(handlers_mod, "serve_fetch", held_serve)
    try:
        async with tiers(deployment, direct=["client1"]) as t:
            admin = t.admin
            client = t.clients["client1"]
            job = admin.create_job("install", pid, ["client1"])
            assert await wait_state(admin, job, "client1", {"transferring"}, 5) == "transferring"
            assert admin.cancel(job) == ["client1"]
            await wait_until(
                lambda: state_of(client.db, job, "client1") == "cancelled", 5, what="client told"
            )
            gate.set()
            await asyncio.sleep(1.5)
            assert states(admin, job) == {"client1": "cancelled"}
            assert state_of(client.db, job, "client1") == "cancelled"
            assert not (install_out / "client1").exists(), "a cancelled job was installed"
            # Nobody wants the package any more: its fetch is dropped, nothing kept.
            await wait_until(
                lambda: not client.store.has(pid) and not list(client.store.partial_dir.iterdir()),
                5,
                what="the cancelled download's files to go",
            )
    finally:
        gate.set()


# -- a wake-up that lands together with the poll timeout -------------------------------------


class LateEvent(asyncio.Event):
    """Every ``set()`` arrives just too late for the waiter: the wait never
    returns, so the poll's timeout cancels it while the flag is already set.
    In real runs this happens when ``Node.wake()`` (a finished install, a
    report from below) runs in the same loop iteration as the timeout."""

    async def wait(self) -> Literal[True]:
        await asyncio.Event().wait()
        return True


async def test_a_wake_landing_with_the_poll_timeout_is_not_lost(
    deployment: Deployment, package_src: Path, install_out: Path
) -> None:
    pid = add_tool(deployment, package_src)
    async with tiers(deployment, direct=["client1"]) as t:
        admin = t.admin
        client = t.clients["client1"]
        client.housekeeping._wake = LateEvent()  # every wake from now on lands late
        job = admin.create_job("install", pid, ["client1"])
        await wait_until(
            lambda: client.db.job(job) is not None, 5, what="client1 to receive the job"
        )
        await wait_until(
            lambda: state_of(admin.db, job, "client1") == "installed",
            3,
            what=lambda: (
                f"client1 to install (client: {state_of(client.db, job, 'client1')!r}, "
                f"server: {state_of(admin.db, job, 'client1')!r})"
            ),
        )


# -- 11. inventory ----------------------------------------------------------------------------


async def test_nodes_json_shows_installed_and_holdings(
    deployment: Deployment, package_src: Path, install_out: Path
) -> None:
    pid = add_tool(deployment, package_src)
    async with tiers(deployment, behind=["client1"], direct=["client2"]) as t:
        admin = t.admin
        m = admin.store.manifest(pid)
        assert m is not None
        expires = iso(m.expires)
        await transfer(admin, pid)
        job = admin.create_job("install", pid, ["client1", "client2"])
        for c in ("client1", "client2"):
            assert await wait_state(admin, job, c, DONE, 10) == "installed"
        await wait_until(lambda: pid in holds(admin, "relay1"), 5, what="holdings")
        home = str(deployment.server.home)
        rc, out, err = await run_cmd([*rdsd_cmd(), "nodes", "--home", home, "--json"])
        assert rc == 0, err
        nodes = {n["name"]: n for n in json.loads(out)}
        assert nodes["client1"]["installed"] == [pid]
        assert nodes["client1"]["via"] == "relay1"
        assert nodes["client2"]["installed"] == [pid]
        assert nodes["relay1"]["holds"] == [{"package": pid, "expires": expires}]
        assert nodes["relay1"]["installed"] == []
        assert nodes["client1"]["holds"] == [] and nodes["client2"]["holds"] == []

        relay_home = str(deployment.configs["relay1"].home)
        rc, out, err = await run_cmd([*rdsd_cmd(), "cache", "list", "--home", relay_home, "--json"])
        assert rc == 0, err
        assert json.loads(out) == [{"package": pid, "size": m.size, "expires": expires}]


def m_expires(admin: Admin, pid: str) -> float:
    m = admin.store.manifest(pid)
    assert m is not None
    return m.expires


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
                # The expiry timer deletes it as it expires, not at a later sweep.
                await wait_until(lambda: not client.store.has(pid), 5, what="offer to expire")
                assert time.time() >= m_expires(admin, pid)
                assert await wait_state(admin, job, "client1", {"failed"}, 10) == "failed"
                detail = admin.job_status(job)["destinations"][0]["detail"]
                assert "expired" in detail
