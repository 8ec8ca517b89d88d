"""The data path across real nodes: a relay forwards each verified chunk to
its waiting child as it lands (cut-through), and a relay restarted in the
middle of that recovers: it resumes its own download from its verified
prefix, and the child below starts over from byte zero."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from dataclasses import replace
from typing import Any

import pytest

import rdsd.packages.download as download_mod
from protocol import Chunk, Fetch, FetchFail, Hello, Side, Welcome
from rdsd.domain import Role
from rdsd.net.session import Peer, Session, Stream
from tests.helpers import Deployment, running, traffic, wait_routed, wait_state, wait_until
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

fetch_log = test_faults.fetch_log  # the fixture: every fetch attempt and its offset


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_cut_through_delivers_while_the_relay_fetches(
    deployment: Deployment, fetch_log: FetchLog
) -> None:
    set_server_option(deployment, chunk_size=256 * KiB)
    pid = add_package(deployment, "tool", 6 * MiB)
    m = manifest_of(deployment, pid)
    want = sha256_file(deployment.root / "src-tool-1.0" / "payload.bin")
    async with running(deployment.server) as (server,):
        relay_cfg = deployment.add_node("relay1", Role.RELAY, server.address)
        async with running(relay_cfg) as (relay,):
            c1 = deployment.add_node("client1", Role.CLIENT, relay.address)
            async with running(c1):
                with deployment.admin() as admin:
                    await wait_routed(admin, "client1", "relay1")
                    job = admin.create_job("install", pid, ["client1"])
                    state = await wait_state(admin, job, "client1", {"installed", "failed"})
                    assert state == "installed"
                served_down = traffic(relay).served["client1"]
    assert sha256_file(extracted_payload(c1.home, job, pid)) == want
    assert traffic(server).served["relay1"] == m.size, "the server sent it once"
    assert served_down == m.size
    # The child's one fetch started while the relay's own was running (the
    # relay had not stored it yet), and the relay read none of it from disk.
    assert fetch_log.offsets("relay1", pid) == [0]
    assert fetch_log.offsets("client1", pid) == [0]
    assert relay.store.disk_reads == 0, "cut-through chunks came from the relay's disk"


async def test_relay_restart_mid_cut_through_recovers(
    deployment: Deployment, fetch_log: FetchLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_server_option(deployment, chunk_size=256 * KiB)
    pid = add_package(deployment, "tool", 6 * MiB)
    m = manifest_of(deployment, pid)
    want = sha256_file(deployment.root / "src-tool-1.0" / "payload.bin")
    # A slow disk, so the relay is stopped while chunks still arrive.
    slow_write = download_mod.Download._write

    def slow(self: Any, *args: Any) -> None:
        time.sleep(0.03)
        slow_write(self, *args)

    monkeypatch.setattr(download_mod.Download, "_write", slow)
    async with running(deployment.server) as (server,):
        # A fixed port, so the client finds the restarted relay where it was.
        port = free_port()
        relay_cfg = replace(
            deployment.add_node("relay1", Role.RELAY, server.address), listen=("127.0.0.1", port)
        )
        c1 = deployment.add_node("client1", Role.CLIENT, ("127.0.0.1", port))
        with deployment.admin() as admin:
            async with running(c1):
                async with running(relay_cfg) as (relay,):
                    await wait_routed(admin, "client1", "relay1")
                    job = admin.create_job("install", pid, ["client1"])
                    await wait_until(
                        lambda: traffic(relay).served["client1"] >= 4 * m.chunk_size,
                        20,
                        what="the client receiving through the relay",
                    )
                    dl = relay.store.active(pid)
                    assert dl is not None and dl.verified < m.size, "not cut-through any more"
                    cut_at = dl.verified
                # The relay is down mid-transfer; it comes back on the same port.
                async with running(relay_cfg):
                    state = await wait_state(admin, job, "client1", {"installed", "failed"}, 60)
                    assert state == "installed", admin.db.dest(job, "client1")
    assert sha256_file(extracted_payload(c1.home, job, pid)) == want
    relay_starts = fetch_log.offsets("relay1", pid)
    client_starts = fetch_log.offsets("client1", pid)
    print(
        f"\nrelay stopped at {cut_at} B verified; relay fetches {relay_starts}, "
        f"client fetches {client_starts}"
    )
    # Upstream the relay resumed from its verified prefix (at least what it
    # had when it was told to stop; chunks in flight were written as it stopped) ...
    assert relay_starts[0] == 0 and len(relay_starts) == 2
    assert cut_at <= relay_starts[1] < m.size
    # ... and below the relay every attempt starts over from byte zero.
    assert len(client_starts) >= 2 and set(client_starts) == {0}


async def test_a_send_cancelled_mid_frame_still_finishes_the_frame() -> None:
    """A chunk is being written in slices to a peer that does not read, and
    the sending task is cancelled (a FETCH_CANCEL, a stop): the frame is
    finished anyway, so the next message is read as itself, not as payload."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[Stream] = loop.create_future()

    def parent_side() -> Stream:
        stream = Stream(Side.PARENT)
        loop.call_soon(accepted.set_result, stream)
        return stream

    server = await loop.create_server(parent_side, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, child_stream = await loop.create_connection(lambda: Stream(Side.CHILD), "127.0.0.1", port)
    parent_stream = await asyncio.wait_for(accepted, 5)
    child = Session(child_stream, Peer("p", Role.SERVER), idle_timeout=10)
    parent = Session(parent_stream, Peer("c", Role.CLIENT), idle_timeout=10)
    try:
        await child.send(Hello(node="c", role="client"))
        assert isinstance(await parent.recv(5), Hello)
        await parent.send(Welcome(node="p", role="server"))
        assert isinstance(await child.recv(5), Welcome)
        await child.send(Fetch(fetch_id=1, package="a-1", offset=0))
        assert isinstance(await parent.recv(5), Fetch)
        # Chunks fill the child's buffers (nobody reads) until a send waits
        # mid-frame; that one is cancelled. 4 MiB chunks: what the cancel
        # leaves to write (the rest of the frame, and up to the 2 MiB the
        # transport held) stays under the 8 MiB after which a peer that
        # reads nothing counts as stalled, which 8 MiB chunks could pass.
        sent: list[bytes] = []
        for _ in range(16):
            data = os.urandom(4 * MiB)
            chunk = Chunk(fetch_id=1, offset=len(sent) * 4 * MiB, data=data)
            sent.append(data)
            sending = asyncio.create_task(parent.send(chunk))
            done, _ = await asyncio.wait({sending}, timeout=0.3)
            if not done:
                break
        assert not sending.done(), "the peer took every chunk: nothing to cancel"
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending
        parent.send_nowait(FetchFail(fetch_id=1, reason="cancelled"))
        for data in sent:
            got = await child.recv(10)
            assert isinstance(got, Chunk) and bytes(got.data) == data
        assert isinstance(await child.recv(10), FetchFail)
    finally:
        child.abort("done")
        parent.abort("done")
        server.close()
