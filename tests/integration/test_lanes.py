"""Lanes (``rdsd/net/lane.py``, SPEC section 6a): a large package crosses
each hop on a connection of its own, moved by threads, with the session's
guarantees: the server sends it once per relay, a relay forwards it as it
lands, a cut below the server resumes from the verified offset and a cut
below a relay starts over, a lane that cannot open leaves the fetch to the
session, and a lane is checked like a session before anything moves.

Links go through ``tests/faultproxy.FaultProxy``: connection 0 is the
child's session, connection 1 its first lane, and so on.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace

from protocol import (
    LANE_MAGIC,
    NEED_DATA,
    Connection,
    Error,
    Fetch,
    FetchFail,
    Hello,
    Message,
    Side,
    Welcome,
)
from rdsd.claims import ClaimSigner
from rdsd.config import HomePaths
from rdsd.domain import HelloPurpose, Role
from rdsd.packages.manifest import Manifest
from rdsd.security import client_context
from tests.faultproxy import DOWN, UP, FaultProxy, cut, delay, split
from tests.helpers import (
    Deployment,
    running,
    traffic,
    wait_child,
    wait_routed,
    wait_state,
    wait_until,
)
from tests.integration import test_faults
from tests.integration.test_faults import (
    FetchLog,
    KiB,
    MiB,
    add_package,
    extracted_payload,
    manifest_of,
    set_server_option,
    sha256_file,
)

fetch_log = test_faults.fetch_log  # the fixture: every fetch attempt, lanes marked
LANE_MIN = 1 * MiB
CHUNK = 256 * KiB


def lanes_from(dep: Deployment, name: str, role: Role, parent: tuple[str, int]) -> None:
    """Add node ``name`` fetching packages of LANE_MIN or more over lanes."""
    cfg = dep.add_node(name, role, parent)
    dep.configs[name] = replace(cfg, lane_min=LANE_MIN)


def big_package(dep: Deployment, size: int) -> tuple[str, Manifest, str]:
    """Package ``big`` of ``size`` random bytes in 256 KiB chunks: its id,
    manifest and the SHA-256 of its payload file."""
    set_server_option(dep, chunk_size=CHUNK)
    pid = add_package(dep, "big", size)
    return pid, manifest_of(dep, pid), sha256_file(dep.root / "src-big-1.0" / "payload.bin")


def lane_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("rdsd-lane")]


async def test_a_large_package_crosses_each_hop_over_a_lane(
    deployment: Deployment, fetch_log: FetchLog
) -> None:
    big, m, want = big_package(deployment, 6 * MiB)
    small = add_package(deployment, "small", 256 * KiB)
    async with running(deployment.server) as (server,):
        lanes_from(deployment, "relay1", Role.RELAY, server.address)
        async with running(deployment.configs["relay1"]) as (relay,):
            lanes_from(deployment, "client1", Role.CLIENT, relay.address)
            async with running(deployment.configs["client1"]):
                with deployment.admin() as admin:
                    await wait_routed(admin, "client1", "relay1")
                    job = admin.create_job("install", big, ["client1"])
                    assert await wait_state(admin, job, "client1", {"installed", "failed"}) == (
                        "installed"
                    )
                    job2 = admin.create_job("install", small, ["client1"])
                    assert await wait_state(admin, job2, "client1", {"installed", "failed"}) == (
                        "installed"
                    )
                served_down = traffic(relay).served["client1"]
    assert sha256_file(extracted_payload(deployment.root / "client1", job, big)) == want
    # Each hop over one lane from byte zero; the server sent the package once.
    assert fetch_log.over_lanes("relay1", big) == [0]
    assert fetch_log.over_lanes("client1", big) == [0]
    assert traffic(server).served["relay1"] == m.size + manifest_of(deployment, small).size
    assert served_down == m.size + manifest_of(deployment, small).size
    # A package under lane_min stays in the session.
    assert fetch_log.offsets("client1", small) == [0]
    assert fetch_log.over_lanes("client1", small) == []
    assert lane_threads() == [], "every lane's thread ended with its transfer"


async def test_a_cut_lane_below_the_server_resumes_from_the_verified_offset(
    deployment: Deployment, fetch_log: FetchLog
) -> None:
    chunk = CHUNK
    pid, m, _ = big_package(deployment, 8 * MiB)
    # The first lane is cut once half the package has gone down it.
    plans = {1: [cut(m.size // 2)]}
    async with running(deployment.server) as (server,), FaultProxy(server.address, plans) as proxy:
        lanes_from(deployment, "relay1", Role.RELAY, proxy.address)
        async with running(deployment.configs["relay1"]):
            await wait_child(server, "relay1")
            with deployment.admin() as admin:
                job = admin.create_job("transfer", pid, ["relay1"])
                assert await wait_state(admin, job, "relay1", {"stored", "failed"}) == "stored"
        lane = proxy.connections[1]
        assert lane.fired_at is not None, "the cut never happened"
        delivered = test_faults.payload_delivered(lane.records[DOWN], lane.fired_at)
    offsets = fetch_log.over_lanes("relay1", pid)
    assert len(offsets) == 2 and offsets[0] == 0, offsets
    # Resumed from whole verified chunks: less than a chunk of what had
    # arrived is asked for again (the one cut in the middle).
    assert offsets[1] % chunk == 0 and 0 <= delivered - offsets[1] < chunk, (offsets, delivered)
    assert traffic(server).served["relay1"] >= m.size
    store = test_faults.store_of(deployment.root / "relay1")
    store.verify(pid)


async def test_a_cut_lane_below_a_relay_starts_over(
    deployment: Deployment, fetch_log: FetchLog
) -> None:
    pid, m, want = big_package(deployment, 6 * MiB)
    async with running(deployment.server) as (server,):
        relay_cfg = deployment.add_node("relay1", Role.RELAY, server.address)
        plans = {1: [cut(m.size // 2)]}
        async with running(relay_cfg) as (relay,), FaultProxy(relay.address, plans) as proxy:
            lanes_from(deployment, "client1", Role.CLIENT, proxy.address)
            async with running(deployment.configs["client1"]):
                await wait_child(relay, "client1")
                with deployment.admin() as admin:
                    await wait_routed(admin, "client1", "relay1")
                    job = admin.create_job("install", pid, ["client1"])
                    state = await wait_state(admin, job, "client1", {"installed", "failed"})
                    assert state == "installed"
            assert proxy.connections[1].fired_at is not None, "the cut never happened"
    assert fetch_log.over_lanes("client1", pid) == [0, 0]
    assert sha256_file(extracted_payload(deployment.root / "client1", job, pid)) == want


async def test_a_lane_that_cannot_open_leaves_the_fetch_to_the_session(
    deployment: Deployment, fetch_log: FetchLog
) -> None:
    pid, _, want = big_package(deployment, 3 * MiB)
    # The lane's first byte never reaches the server: its TLS cannot start.
    plans = {1: [cut(0, UP)]}
    async with running(deployment.server) as (server,), FaultProxy(server.address, plans) as proxy:
        lanes_from(deployment, "client1", Role.CLIENT, proxy.address)
        async with running(deployment.configs["client1"]):
            await wait_child(server, "client1")
            with deployment.admin() as admin:
                job = admin.create_job("install", pid, ["client1"])
                state = await wait_state(admin, job, "client1", {"installed", "failed"})
                assert state == "installed"
    # One lane attempt, then the same attempt over the session, from byte zero.
    assert fetch_log.over_lanes("client1", pid) == [0]
    assert fetch_log.offsets("client1", pid) == [0, 0]
    assert sha256_file(extracted_payload(deployment.root / "client1", job, pid)) == want


async def test_a_node_stops_promptly_with_a_lane_in_flight(
    deployment: Deployment, fetch_log: FetchLog
) -> None:
    pid, _, _ = big_package(deployment, 8 * MiB)
    async with running(deployment.server) as (server,):
        # The lane crawls (16 KiB pieces, 5 ms apart), so it is mid-transfer.
        slow = [delay(0.005, DOWN), split(16 * KiB, DOWN)]
        async with FaultProxy(server.address, plans={1: slow}) as proxy:
            lanes_from(deployment, "client1", Role.CLIENT, proxy.address)
            async with running(deployment.configs["client1"]) as (client,):
                await wait_child(server, "client1")
                with deployment.admin() as admin:
                    admin.create_job("install", pid, ["client1"])
                    lane = await proxy.wait_connections(2)
                    await wait_until(lambda: lane.forwarded[DOWN] > MiB, 20, 0.01)
                    assert lane_threads(), "the transfer runs in a lane's thread"
                    started = time.monotonic()
                    await client.stop()
                    took = time.monotonic() - started
            await wait_until(lambda: not lane_threads(), 5, 0.01, "the lane threads to end")
    assert took < 5, f"stopping took {took:.1f}s"
    part = HomePaths(deployment.root / "client1").store / "partial" / f"{pid}.part"
    assert part.exists(), "the verified prefix stays for the next start (below the server)"


# -- a lane is checked like a session -----------------------------------------------------------


def raw_lane(
    address: tuple[str, int], home: HomePaths, hello: Hello, then: Message | None
) -> Message:
    """Open a lane by hand as the node of ``home``: preamble, TLS, ``hello``
    and, once welcomed, ``then``; the parent's answer to the last."""
    import socket

    ctx = client_context(home.ca_cert, home.cert, home.key)
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(LANE_MAGIC)
        with ctx.wrap_socket(sock, server_hostname=address[0]) as tls:
            conn = Connection(Side.CHILD)

            def send(msg: Message) -> None:
                for buf in conn.send(msg):
                    tls.sendall(buf)

            def receive() -> Message:
                while True:
                    event = conn.next_event()
                    if event is not NEED_DATA:
                        assert isinstance(event, Message), event
                        return event
                    data = tls.recv(65536)
                    conn.receive_data(data)
                    if not data:
                        raise EOFError("the parent closed the lane")

            send(hello)
            answer = receive()
            if then is None or not isinstance(answer, Welcome):
                return answer
            send(then)
            return receive()


def hello_for(home: HomePaths, name: str, parent: str, purpose: HelloPurpose) -> Hello:
    signer = ClaimSigner.from_file(home.key)
    claim = signer.attach(name, Role.CLIENT, parent, time.time_ns() // 1000, time.time())
    return Hello(node=name, role=Role.CLIENT, purpose=purpose, attach=claim)


async def test_a_lane_is_refused_what_a_session_would_be(deployment: Deployment) -> None:
    pid = add_package(deployment, "big", 2 * MiB)
    async with running(deployment.server) as (server,):
        deployment.add_node("client1", Role.CLIENT, server.address)
        home = HomePaths(deployment.root / "client1")
        lane_hello = hello_for(home, "client1", "server", HelloPurpose.LANE)
        # A fetch no job allows: FETCH_FAIL with the reason, nothing sent.
        fetch = Fetch(fetch_id=1, package=pid, offset=0)
        answer = await asyncio.to_thread(raw_lane, server.address, home, lane_hello, fetch)
        assert isinstance(answer, FetchFail) and "no job gives client1" in answer.reason
        assert traffic(server).served["client1"] == 0
        # A lane's HELLO must say it is one.
        session_hello = hello_for(home, "client1", "server", HelloPurpose.SESSION)
        answer = await asyncio.to_thread(raw_lane, server.address, home, session_hello, None)
        assert isinstance(answer, Error) and "purpose" in answer.reason
        # A claim naming another parent is refused as on a session.
        elsewhere = hello_for(home, "client1", "relay9", HelloPurpose.LANE)
        answer = await asyncio.to_thread(raw_lane, server.address, home, elsewhere, None)
        assert isinstance(answer, Error) and "attach claim" in answer.reason
        # The lane purpose is refused on a session (it opens without the preamble).
        answer = await asyncio.to_thread(no_preamble_lane, server.address, home, lane_hello)
        assert isinstance(answer, Error) and "lane preamble" in answer.reason


def no_preamble_lane(address: tuple[str, int], home: HomePaths, hello: Hello) -> Message:
    """A lane HELLO sent on a session connection: the parent's answer."""
    import socket

    ctx = client_context(home.ca_cert, home.cert, home.key)
    with (
        socket.create_connection(address, timeout=10) as sock,
        ctx.wrap_socket(sock, server_hostname=address[0]) as tls,
    ):
        conn = Connection(Side.CHILD)
        for buf in conn.send(hello):
            tls.sendall(buf)
        while True:
            event = conn.next_event()
            if event is not NEED_DATA:
                assert isinstance(event, Message), event
                return event
            data = tls.recv(65536)
            conn.receive_data(data)
            if not data:
                raise EOFError("the parent closed the connection")


async def test_a_corrupt_storehouse_is_caught_before_a_lane_sends_it(
    deployment: Deployment, fetch_log: FetchLog
) -> None:
    """A stored package not yet checked in this process is hashed chunk by
    chunk as a lane reads it: the bad chunk never leaves, the child's job
    fails naming the digest, and nothing is installed."""
    pid = add_package(deployment, "big", 3 * MiB)
    m = manifest_of(deployment, pid)
    test_faults.flip_bytes(deployment.server.home / "store" / f"{pid}.pkg", m.size // 2)
    async with running(deployment.server) as (server,):
        lanes_from(deployment, "client1", Role.CLIENT, server.address)
        async with running(deployment.configs["client1"]):
            with deployment.admin() as admin:
                job = admin.create_job("install", pid, ["client1"])
                state = await wait_state(admin, job, "client1", {"installed", "failed"}, 30)
                detail = test_faults.dest_of(admin, job, "client1")["detail"]
        served = traffic(server).served["client1"]
    assert fetch_log.over_lanes("client1", pid)[0] == 0
    assert state == "failed" and "digest" in detail, detail
    assert served < m.size // 2 + m.chunk_size, "nothing at or after the bad chunk went"
    home = HomePaths(deployment.root / "client1")
    assert not list(home.work.glob(f"{job}-*")) and not test_faults.store_of(home.home).ids()
