"""Integration tests over real mutual-TLS sockets on 127.0.0.1.

They cover what an operator relies on beyond the happy path: offline nodes
catching up, a job never running twice, failing and hanging install
commands, peers from another deployment or revoked, garbage on the port,
and a peer that lies in HELLO or asks for a package no job gives it. Hostile
peers are built by hand from ``protocol.Connection(Side.CHILD)`` over an
``ssl`` stream so the bytes on the wire are exactly what the test says.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import ssl
import struct
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from protocol import (
    MAGIC,
    Chunk,
    ConnectionClosed,
    Error,
    ErrorCode,
    Fetch,
    FetchEnd,
    FetchFail,
    Hello,
    JobNotice,
    Message,
    Ping,
    Pong,
    Report,
    Topology,
    Welcome,
    encode,
)
from rdsd.admin import Admin, enroll, init_node, init_server
from rdsd.config import NodeConfig
from rdsd.domain import Role
from rdsd.errors import AdminError
from rdsd.node import runner as runner_mod
from rdsd.node.install import forget
from tests.helpers import (
    FAST,
    Deployment,
    RawChild,
    children,
    running,
    wait_child,
    wait_routed,
    wait_state,
    wait_until,
)

DONE = {"installed", "failed"}

COUNT_SCRIPT = """#!/bin/sh
echo "$RDSD_JOB" >> "$RDSD_TEST_OUT/count-$RDSD_NODE.txt"
"""

FAIL_SCRIPT = """#!/bin/sh
echo "preparing"
echo "disk on fire" >&2
exit 3
"""

SLEEP_SCRIPT = """#!/bin/sh
echo $$ > "$RDSD_TEST_OUT/sleeper-$RDSD_NODE.pid"
exec sleep 30
"""


# -- helpers ------------------------------------------------------------------------


def add_script_package(
    dep: Deployment, name: str, script: str, version: str = "1.0", size: int = 200_000
) -> str:
    """A package whose install command is ``sh install.sh`` with ``script``."""
    src = dep.root / f"src-{name}-{version}"
    src.mkdir(parents=True)
    (src / "install.sh").write_text(script)
    (src / "payload.bin").write_bytes(os.urandom(size))
    with dep.admin() as admin:
        return admin.add_package(src, name, version, install="sh install.sh")


def install_runs(out: Path, node: str) -> list[str]:
    """Job ids the counting install script recorded for ``node``, one per run."""
    path = out / f"count-{node}.txt"
    return path.read_text().split() if path.exists() else []


async def assert_stays(admin: Admin, job: str, node: str, state: str, seconds: float) -> None:
    """The destination's state is ``state`` for the whole of ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        dests = {d["node"]: d for d in admin.job_status(job)["destinations"]}
        assert dests[node]["state"] == state, dests[node]
        await asyncio.sleep(0.05)


def detail(admin: Admin, job: str, node: str) -> str:
    for d in admin.job_status(job)["destinations"]:
        if d["node"] == node:
            return str(d["detail"])
    raise AssertionError(f"{node} is not a destination of {job}")


async def first_answer(
    address: tuple[str, int], home: Path, ca_home: Path, node: str
) -> Message | ConnectionClosed | OSError:
    """What a session HELLO as ``node`` with ``home``'s identity gets back: a
    message, the connection closing, or the TLS/socket error that stopped it."""
    try:
        raw = await RawChild.connect(address, home, ca_home)
    except OSError as exc:  # ssl.SSLError and ConnectionError are OSErrors
        return exc
    try:
        await raw.send(Hello(node=node, role="client", purpose="session"))
        return await raw.recv()
    except OSError as exc:
        return exc
    finally:
        await raw.close()


async def read_until_closed(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """Everything the peer sends until it closes (EOF or reset); fails the
    test if it keeps the connection open longer than ``timeout``."""
    data = bytearray()
    async with asyncio.timeout(timeout):
        while True:
            try:
                chunk = await reader.read(65536)
            except (ConnectionError, ssl.SSLError):
                return bytes(data)
            if not chunk:
                return bytes(data)
            data += chunk


async def install_one(dep: Deployment, pid: str, node: str, timeout: float = 15) -> str:
    with dep.admin() as admin:
        job = admin.create_job("install", pid, [node])
        return await wait_state(admin, job, node, DONE, timeout)


# -- offline nodes catch up -----------------------------------------------------------


async def test_offline_client_under_server_catches_up(
    deployment: Deployment, install_out: Path
) -> None:
    pid = add_script_package(deployment, "tool", COUNT_SCRIPT)
    async with running(deployment.server) as (server,):
        c1 = deployment.add_node("client1", Role.CLIENT, server.address)
        with deployment.admin() as admin:
            job = admin.create_job("install", pid, ["client1"])
            await assert_stays(admin, job, "client1", "waiting", 1.0)
            async with running(c1):
                assert await wait_state(admin, job, "client1", DONE, 15) == "installed"
    assert install_runs(install_out, "client1") == [job]


async def test_offline_client_behind_relay_catches_up(
    deployment: Deployment, install_out: Path
) -> None:
    pid = add_script_package(deployment, "tool", COUNT_SCRIPT)
    async with running(deployment.server) as (server,):
        relay_cfg = deployment.add_node("relay1", Role.RELAY, server.address)
        async with running(relay_cfg) as (relay,):
            c1 = deployment.add_node("client1", Role.CLIENT, relay.address)
            with deployment.admin() as admin:
                async with running(c1):  # connects once, so the server learns the route
                    await wait_routed(admin, "client1", "relay1")
                await wait_child(relay, "client1", present=False)
                job = admin.create_job("install", pid, ["client1"])
                # The job travels to the relay, which holds it for its absent child.
                with deployment.admin("relay1") as radmin:
                    await wait_until(lambda: radmin.db.dest(job, "client1") is not None, 10)
                    await assert_stays(admin, job, "client1", "waiting", 1.0)
                    assert radmin.db.dest(job, "client1").state == "waiting"  # type: ignore[union-attr]
                async with running(c1):
                    assert await wait_state(admin, job, "client1", DONE, 15) == "installed"
    assert install_runs(install_out, "client1") == [job]


async def test_job_never_runs_twice_across_restart(
    deployment: Deployment, install_out: Path
) -> None:
    pid = add_script_package(deployment, "tool", COUNT_SCRIPT)
    async with running(deployment.server) as (server,):
        c1 = deployment.add_node("client1", Role.CLIENT, server.address)
        with deployment.admin() as admin:
            async with running(c1):
                job = admin.create_job("install", pid, ["client1"])
                assert await wait_state(admin, job, "client1", DONE, 15) == "installed"
            assert install_runs(install_out, "client1") == [job]
            async with running(c1):  # same config, same home
                await wait_child(server, "client1")
                await assert_stays(admin, job, "client1", "installed", 1.5)
            with Admin(c1.home) as cadmin:
                dest = cadmin.db.dest(job, "client1")
                assert dest is not None and dest.state == "installed"
    assert install_runs(install_out, "client1") == [job]


# -- install commands that fail --------------------------------------------------------


async def test_failing_install_command_reports_status_and_message(
    deployment: Deployment, install_out: Path
) -> None:
    pid = add_script_package(deployment, "broken", FAIL_SCRIPT)
    async with running(deployment.server) as (server,):
        c1 = deployment.add_node("client1", Role.CLIENT, server.address)
        async with running(c1):
            with deployment.admin() as admin:
                job = admin.create_job("install", pid, ["client1"])
                assert await wait_state(admin, job, "client1", DONE, 15) == "failed"
                text = detail(admin, job, "client1")
    assert re.search(r"\b3\b", text), text
    assert "disk on fire" in text, text


async def test_install_command_timeout_fails_and_kills_it(
    deployment: Deployment, install_out: Path
) -> None:
    pid = add_script_package(deployment, "hang", SLEEP_SCRIPT)
    async with running(deployment.server) as (server,):
        cfg = deployment.add_node("client1", Role.CLIENT, server.address)
        c1 = replace(cfg, install_timeout=1.0)
        async with running(c1):
            with deployment.admin() as admin:
                job = admin.create_job("install", pid, ["client1"])
                started = time.monotonic()
                assert await wait_state(admin, job, "client1", DONE, 10) == "failed"
                elapsed = time.monotonic() - started
                text = detail(admin, job, "client1")
    assert "timed out" in text, text
    assert elapsed < 8, f"took {elapsed:.1f}s for a 1s install timeout"
    sleeper = int((install_out / "sleeper-client1.pid").read_text())
    async with asyncio.timeout(3):
        while True:
            try:
                os.kill(sleeper, 0)
            except ProcessLookupError:
                break
            await asyncio.sleep(0.05)


# -- peers that must be refused ---------------------------------------------------------


async def test_peer_from_another_ca_is_refused(
    deployment: Deployment, install_out: Path, tmp_path: Path
) -> None:
    pid = add_script_package(deployment, "tool", COUNT_SCRIPT)
    other = tmp_path / "other"
    init_server(other / "server", name="server", listen=("127.0.0.1", 0))
    async with running(deployment.server) as (server,):
        # Our client1 is enrolled but stays offline; an impostor with the same
        # name and a certificate from the other deployment's CA tries its luck.
        deployment.add_node("client1", Role.CLIENT, server.address)
        c2 = deployment.add_node("client2", Role.CLIENT, server.address)
        enroll(other / "server", "client1", "client", other / "client1.bundle")
        init_node(other / "client1", Role.CLIENT, other / "client1.bundle", server.address)
        impostor = NodeConfig.load(other / "client1", **FAST)

        # A hand-made connection that trusts our CA (so only the server's own
        # check stands in the way) but presents the foreign certificate.
        # The TLS handshake itself must fail: not even HELLO gets an answer.
        outcome = await first_answer(
            server.address, other / "client1", deployment.server.home, "client1"
        )
        assert isinstance(outcome, (ssl.SSLError, ConnectionError, ConnectionClosed)), outcome

        async with running(impostor, c2):
            await wait_child(server, "client2")
            with deployment.admin() as admin:
                job = admin.create_job("install", pid, ["client1", "client2"])
                assert await wait_state(admin, job, "client2", DONE, 15) == "installed"
                await assert_stays(admin, job, "client1", "waiting", 1.0)
                assert "client1" not in children(server)
                seen = {n["name"]: n["last_seen"] for n in admin.nodes()}
    assert seen["client1"] is None
    assert install_runs(install_out, "client1") == []
    assert install_runs(install_out, "client2") == [job]


async def test_revoked_node_is_disconnected_and_refused(
    deployment: Deployment, install_out: Path
) -> None:
    pid = add_script_package(deployment, "tool", COUNT_SCRIPT)
    async with running(deployment.server) as (server,):
        c1 = deployment.add_node("client1", Role.CLIENT, server.address)
        c2 = deployment.add_node("client2", Role.CLIENT, server.address)
        async with running(c1, c2):
            await wait_child(server, "client1")
            await wait_child(server, "client2")
            with deployment.admin() as admin:
                admin.revoke("client1")
                await wait_child(server, "client1", present=False, timeout=2.0)
                # It keeps trying to come back and is refused every time.
                deadline = time.monotonic() + 1.0
                while time.monotonic() < deadline:
                    assert "client1" not in children(server)
                    await asyncio.sleep(0.02)
                raw = await RawChild.connect(server.address, c1.home)
                try:
                    await raw.send(Hello(node="client1", role="client", purpose="query"))
                    answer = await raw.recv()
                    assert isinstance(answer, Error), answer
                    assert answer.code == ErrorCode.REVOKED
                    assert isinstance(await raw.recv(), ConnectionClosed)
                finally:
                    await raw.close()
                # A revoked node gets no new jobs; the others go on as before.
                with pytest.raises(AdminError, match="revoked"):
                    admin.create_job("install", pid, ["client1", "client2"])
                job = admin.create_job("install", pid, ["client2"])
                assert await wait_state(admin, job, "client2", DONE, 15) == "installed"
    assert install_runs(install_out, "client1") == []


async def test_revoked_client_behind_relay_is_disconnected(
    deployment: Deployment, install_out: Path
) -> None:
    """``rdsd node revoke``: refused from then on, an open session is closed
    — wherever in the tree the node's session is."""
    pid = add_script_package(deployment, "tool", COUNT_SCRIPT)
    async with running(deployment.server) as (server,):
        relay_cfg = deployment.add_node("relay1", Role.RELAY, server.address)
        async with running(relay_cfg) as (relay,):
            c1 = deployment.add_node("client1", Role.CLIENT, relay.address)
            async with running(c1):
                with deployment.admin() as admin:
                    await wait_routed(admin, "client1", "relay1")
                    # A job made while the node was still trusted...
                    job = admin.create_job("install", pid, ["client1"], at=time.time() + 1.5)
                    admin.revoke("client1")
                    await wait_child(relay, "client1", present=False, timeout=3.0)
                    # ...is never delivered once it is revoked.
                    await assert_stays(admin, job, "client1", "waiting", 2.5)
    assert install_runs(install_out, "client1") == []


async def test_a_revocation_list_longer_than_one_frame_reaches_a_relay_whole(
    deployment: Deployment,
) -> None:
    """20,001 revoked names of 64 characters (1.3 MB, over the 1 MiB header
    cap of one frame) go to a relay in batches of MAX_REVOKED_BATCH; the
    relay takes the list once the last batch is in, and refuses a revoked
    client on its own."""
    names = [f"gone-{i:05d}-{'x' * 53}" for i in range(20_000)]
    with deployment.admin() as admin:
        for name in names:
            admin.db.enroll(name, Role.CLIENT)
            admin.db.revoke(name)
    async with running(deployment.server) as (server,):
        relay_cfg = deployment.add_node("relay1", Role.RELAY, server.address)
        deployment.add_node("client1", Role.CLIENT, ("127.0.0.1", 1))
        with deployment.admin() as admin:
            admin.revoke("client1")
        async with running(relay_cfg) as (relay,):
            want = set(names) | {"client1"}
            await wait_until(
                lambda: set(relay.db.revoked()) == want, 10, what="the whole list at the relay"
            )
            async with running(deployment.reparent("client1", relay.address)) as (client,):
                uplink = client.uplink
                assert uplink is not None
                await wait_until(
                    lambda: "revoked" in (uplink.last_error or ""),
                    10,
                    what="the relay to refuse the revoked client",
                )


# -- garbage on the port ------------------------------------------------------------------


def _random_garbage() -> bytes:
    data = random.Random(20240601).randbytes(4096)
    assert data[0] != 0x16  # not a TLS handshake record, so no wait for more
    return data


@pytest.mark.parametrize(
    "payload",
    [_random_garbage(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"],
    ids=["random-bytes", "http-get"],
)
async def test_plain_tcp_garbage_is_dropped(
    deployment: Deployment, install_out: Path, payload: bytes
) -> None:
    pid = add_script_package(deployment, "tool", COUNT_SCRIPT)
    async with running(deployment.server) as (server,):
        c1 = deployment.add_node("client1", Role.CLIENT, server.address)
        async with running(c1):
            await wait_child(server, "client1")
            before = children(server)["client1"]
            reader, writer = await asyncio.open_connection(*server.address)
            try:
                with contextlib.suppress(ConnectionError):
                    writer.write(payload)
                    await writer.drain()
                await read_until_closed(reader, timeout=5.0)
            finally:
                writer.close()
            assert children(server).get("client1") is before
            assert not before.session.closed
            assert await install_one(deployment, pid, "client1") == "installed"


# Each case: what to send after TLS, whether to say HELLO first, the ERROR code.
FRAME_CASES = {
    "garbage-preamble": (b"GARBAGE\x00\xff" * 50, False, ErrorCode.PROTOCOL),
    "oversized-before-hello": (
        MAGIC + struct.pack(">II", 0xFFFFFFFF, 0),
        False,
        ErrorCode.FRAME_TOO_LARGE,
    ),
    "oversized-after-hello": (struct.pack(">II", 0xFFFFFFFF, 0), True, ErrorCode.FRAME_TOO_LARGE),
    "garbage-after-hello": (
        struct.pack(">II", 5, 0) + b"\xc1\xc1\xc1\xc1\xc1",
        True,
        ErrorCode.PROTOCOL,
    ),
    # A message only a parent may send, and a second HELLO: out of state.
    "parent-message-from-child": (
        b"".join(bytes(b) for b in encode(Welcome(node="client2", role="client"))),
        True,
        ErrorCode.PROTOCOL,
    ),
    "second-hello": (
        b"".join(bytes(b) for b in encode(Hello(node="client2", role="client"))),
        True,
        ErrorCode.PROTOCOL,
    ),
}


@pytest.mark.parametrize("case", list(FRAME_CASES))
async def test_tls_garbage_gets_error_and_close(
    deployment: Deployment, install_out: Path, case: str
) -> None:
    data, hello_first, code = FRAME_CASES[case]
    pid = add_script_package(deployment, "tool", COUNT_SCRIPT)
    async with running(deployment.server) as (server,):
        c1 = deployment.add_node("client1", Role.CLIENT, server.address)
        c2 = deployment.add_node("client2", Role.CLIENT, server.address)
        async with running(c1):
            await wait_child(server, "client1")
            before = children(server)["client1"]
            raw = await RawChild.connect(server.address, c2.home)
            try:
                if hello_first:
                    await raw.handshake("client2")
                await raw.send_raw(data)
                answer = await raw.recv()
                assert isinstance(answer, Error), answer
                assert answer.code == code, answer
                closed = await raw.recv()
                assert isinstance(closed, ConnectionClosed), closed
            finally:
                await raw.close()
            assert children(server).get("client1") is before
            assert not before.session.closed
            assert await install_one(deployment, pid, "client1") == "installed"


# -- a peer that lies or asks for too much ----------------------------------------------------


@pytest.mark.parametrize(
    ("node", "role"), [("client2", "client"), ("client1", "relay")], ids=["name", "role"]
)
async def test_hello_not_matching_certificate_is_refused(
    deployment: Deployment, node: str, role: str
) -> None:
    async with running(deployment.server) as (server,):
        c1 = deployment.add_node("client1", Role.CLIENT, server.address)
        deployment.add_node("client2", Role.CLIENT, server.address)
        raw = await RawChild.connect(server.address, c1.home)
        try:
            await raw.send(Hello(node=node, role=role, purpose="session"))
            answer = await raw.recv()
            assert isinstance(answer, Error), answer
            assert answer.code == ErrorCode.UNAUTHORIZED
            assert "client1" in answer.reason
            assert isinstance(await raw.recv(), ConnectionClosed)
        finally:
            await raw.close()
        assert children(server) == {}
        with deployment.admin() as admin:
            assert {n["name"]: n["last_seen"] for n in admin.nodes()} == {
                "client1": None,
                "client2": None,
            }


async def test_fetch_without_a_job_is_refused(deployment: Deployment, install_out: Path) -> None:
    pid = add_script_package(deployment, "tool", COUNT_SCRIPT)
    async with running(deployment.server) as (server,):
        c1 = deployment.add_node("client1", Role.CLIENT, server.address)
        deployment.add_node("client2", Role.CLIENT, server.address)
        with deployment.admin() as admin:
            admin.create_job("install", pid, ["client2"])  # a job, but not for client1
        raw = await RawChild.connect(server.address, c1.home)
        try:
            await raw.handshake("client1")
            await raw.send(Fetch(fetch_id=1, package=pid, offset=0))
            answer = await raw.recv()
            assert isinstance(answer, FetchFail), answer
            assert answer.fetch_id == 1
            await raw.send(Fetch(fetch_id=2, package="nosuch-9.9", offset=0))
            answer = await raw.recv()
            assert isinstance(answer, FetchFail), answer
            assert answer.fetch_id == 2
            # Refusing a fetch is not a reason to drop the session.
            await raw.send(Ping(nonce=7))
            assert await raw.recv() == Pong(nonce=7)
        finally:
            await raw.close()


@pytest.mark.parametrize("case", ["topology-from-client", "report-for-another-node"])
async def test_unauthorized_message_after_welcome_gets_error(
    deployment: Deployment, install_out: Path, case: str
) -> None:
    pid = add_script_package(deployment, "tool", COUNT_SCRIPT)
    async with running(deployment.server) as (server,):
        c1 = deployment.add_node("client1", Role.CLIENT, server.address)
        deployment.add_node("client2", Role.CLIENT, server.address)
        with deployment.admin() as admin:
            job = admin.create_job("install", pid, ["client2"])
        msg: Message = (
            Topology(nodes={"client2": b"claim"})
            if case == "topology-from-client"
            else Report(
                report_id="client1:1",
                job=job,
                node="client2",
                state="installed",
                seq=1,
                package=pid,
                origin="client1",
            )
        )
        raw = await RawChild.connect(server.address, c1.home)
        try:
            await raw.handshake("client1", purpose="session")
            await raw.send(msg)
            answer = await raw.recv()
            assert isinstance(answer, Error), answer
            assert answer.code == ErrorCode.UNAUTHORIZED, answer
            assert isinstance(await raw.recv(), ConnectionClosed)
        finally:
            await raw.close()
        with deployment.admin() as admin:
            assert admin.job_status(job)["destinations"][0]["state"] == "waiting"
            assert admin.db.node("client2").via is None  # type: ignore[union-attr]


async def test_revoked_name_cannot_be_enrolled_again(deployment: Deployment) -> None:
    enroll(deployment.server.home, "laptop", "client", deployment.root / "a.bundle")
    with deployment.admin() as admin:
        admin.revoke("laptop")
    with pytest.raises(AdminError, match="revoked"):
        enroll(deployment.server.home, "laptop", "client", deployment.root / "b.bundle")
    with deployment.admin() as admin:
        row = admin.db.node("laptop")
        assert row is not None and row.revoked


async def test_control_messages_never_split_a_sliced_chunk(deployment: Deployment) -> None:
    """Chunks leave in slices (the TLS layer keeps a buffer the size of the
    largest write); PONGs and other control messages sent meanwhile follow
    the frame in progress instead of landing inside it. The child's decoder
    refuses any malformed frame, so a clean stream of chunks and PONGs is
    the proof."""
    src = deployment.root / "src-sliced"
    src.mkdir()
    (src / "payload.bin").write_bytes(os.urandom(16 * 1024 * 1024))
    with deployment.admin() as admin:
        pid = admin.add_package(src, "sliced", "1.0")
    async with running(deployment.server) as (server,):
        cfg = deployment.add_node("client1", Role.CLIENT, server.address)
        with deployment.admin() as admin:
            admin.create_job("install", pid, ["client1"])
        raw = await RawChild.connect(server.address, cfg.home)
        try:
            await raw.handshake("client1", purpose="session")
            await raw.send(Fetch(fetch_id=1, package=pid))
            # Read nothing for a while: the kernel's buffers and then the
            # session's fill, and the sender pauses inside a chunk frame.
            await asyncio.sleep(1.0)
            for nonce in range(1, 21):
                await raw.send(Ping(nonce=nonce))
            await asyncio.sleep(0.2)
            pongs: set[int] = set()
            got, done = 0, False
            while not (done and len(pongs) == 20):
                msg = await raw.recv(20)
                if isinstance(msg, Chunk):
                    got += len(msg.data)
                elif isinstance(msg, Pong):
                    pongs.add(msg.nonce)
                elif isinstance(msg, FetchEnd):
                    done = True
                    assert msg.size == got
                elif not isinstance(msg, (JobNotice, Ping)):
                    raise AssertionError(f"unexpected {msg!r}")
            assert pongs == set(range(1, 21))
            assert got == (deployment.server.paths.store / f"{pid}.pkg").stat().st_size
        finally:
            await raw.close()


async def test_the_outcome_goes_up_while_the_install_tree_is_deleted(
    deployment: Deployment, install_out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Removing what an install leaves (its tree: the extracted package)
    does not hold the event loop, so the outcome's report reaches the
    server while the removal is still going on."""
    removing, release = threading.Event(), threading.Event()
    released_in_time: list[bool] = []

    def slow_forget(workdir: Path, job: str) -> None:
        removing.set()
        released_in_time.append(release.wait(10))
        forget(workdir, job)

    monkeypatch.setattr(runner_mod, "forget", slow_forget)
    pid = add_script_package(deployment, "quick", COUNT_SCRIPT)
    async with running(deployment.server) as (server,):
        c1 = deployment.add_node("client1", Role.CLIENT, server.address)
        async with running(c1):
            with deployment.admin() as admin:
                job = admin.create_job("install", pid, ["client1"])
                try:
                    assert await wait_state(admin, job, "client1", DONE, 15) == "installed"
                    assert removing.is_set()
                finally:
                    release.set()
                await wait_until(lambda: bool(released_in_time), 15)
    assert released_in_time == [True]
