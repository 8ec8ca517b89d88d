"""Faults on the wire, on disk and in the process: what §3 of the design
promises when things break.

Links go through ``tests/faultproxy.FaultProxy`` (127.0.0.1 only), which
cuts, resets, stalls, delays or splits one connection by its index. Nodes run
in this event loop where a test needs to look inside them (``served``
counters, stores) and as real ``rdsd run`` subprocesses where a test kills
them with SIGKILL or limits their file size. ``pytest -s`` prints the resume
table and the kill -9 tally.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

import rdsd.child.fetcher as fetcher_mod
import rdsd.net.lane as lane_mod
import rdsd.net.transfer as transfer_mod
import rdsd.packages.download as download_mod
from protocol import ConnectionClosed, Message, Report
from rdsd.admin import Admin
from rdsd.config import HomePaths, NodeConfig
from rdsd.domain import Role
from rdsd.errors import DiskFull, StoreError
from rdsd.node import Node
from rdsd.packages.manifest import Envelopes, Manifest
from rdsd.packages.store import Store
from rdsd.security import Verifier
from rdsd.state import Applied, JobDB
from tests.faultproxy import (
    DOWN,
    UP,
    Fault,
    FaultProxy,
    RecordTracker,
    cut,
    delay,
    reset,
    split,
    stall,
)
from tests.helpers import (
    FAST,
    Deployment,
    RawChild,
    make_payload_dir,
    rdsd_cmd,
    routed,
    running,
    traffic,
    wait_child,
    wait_state,
    wait_until,
)

KiB = 1024
MiB = 1024 * KiB
TLS_RECORD = 16 * KiB  # plaintext bytes in a full TLS record
FULL_RECORD = TLS_RECORD + 17  # its length field under TLS 1.3 AEAD
REPO = Path(__file__).resolve().parents[2]

DONE = {"installed", "failed"}

COUNT_SCRIPT = """#!/bin/sh
echo "$RDSD_JOB" >> "$RDSD_TEST_OUT/runs-$RDSD_NODE.txt"
sleep "${RDSD_TEST_SLEEP:-0}"
"""


# -- helpers --------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(MiB):
            h.update(block)
    return h.hexdigest()


def set_option(home: Path, **values: Any) -> None:
    """Change settings in a home's rdsd.toml (chunk size, listen address)."""
    replace(NodeConfig.load(home), **values).save()


def set_server_option(dep: Deployment, **values: Any) -> None:
    set_option(dep.server.home, **values)
    dep.server = NodeConfig.load(dep.server.home, **FAST)


def add_package(
    dep: Deployment,
    name: str,
    size: int,
    version: str = "1.0",
    script: str | None = None,
    seed: int = 0,
) -> str:
    """A package of ``size`` random payload bytes (plus tar overhead); with
    ``script`` its install command is ``sh install.sh``."""
    src = dep.root / f"src-{name}-{version}"
    src.mkdir(parents=True)
    rng = random.Random(f"{name}-{version}-{seed}")
    with (src / "payload.bin").open("wb") as f:
        left = size
        while left > 0:
            n = min(left, MiB)
            f.write(rng.randbytes(n))
            left -= n
    if script is not None:
        (src / "install.sh").write_text(script)
    with dep.admin() as admin:
        return admin.add_package(src, name, version, install="sh install.sh" if script else None)


def manifest_of(dep: Deployment, pid: str) -> Manifest:
    with dep.admin() as admin:
        m = admin.store.manifest(pid)
    assert m is not None
    return m


def dest_of(admin: Admin, job: str, node: str) -> dict[str, Any]:
    for d in admin.job_status(job)["destinations"]:
        if d["node"] == node:
            return dict(d)
    raise AssertionError(f"{node} is not a destination of {job}")


def store_of(home: Path) -> Store:
    paths = HomePaths(home)
    return Store(paths.store, Envelopes(Verifier(paths.signing_pub.read_bytes())))


def corrupt_packages(home: Path) -> list[str]:
    """Complete packages in ``home``'s store that do not verify."""
    store = store_of(home)
    bad = []
    for pid in store.ids():
        try:
            store.verify(pid)
        except FileNotFoundError:
            continue  # deleted (envelope first) while we looked
        except StoreError as exc:
            if store.has(pid):
                bad.append(f"{home.name}/{pid}: {exc}")
    return bad


@contextlib.contextmanager
def job_db(home: Path) -> Iterator[JobDB]:
    """Another node's job database, read from outside (as an operator would)."""
    db = JobDB(HomePaths(home).db)
    try:
        yield db
    finally:
        db.close()


def extracted_payload(home: Path, job: str, pid: str) -> Path:
    return HomePaths(home).work / f"{job}-{pid}" / "payload.bin"


@dataclass
class FetchLog:
    """Every fetch attempt of in-process nodes: (node, package, from offset);
    ``on_start`` runs at each, just before the FETCH goes out."""

    starts: list[tuple[str, str, int]] = field(default_factory=list)
    on_start: Callable[[], None] | None = None
    #: The attempts that went over a lane (``net/lane.py``), as in ``starts``.
    lanes: list[tuple[str, str, int]] = field(default_factory=list)

    def offsets(self, node: str, package: str) -> list[int]:
        return [off for n, p, off in self.starts if n == node and p == package]

    def over_lanes(self, node: str, package: str) -> list[int]:
        return [off for n, p, off in self.lanes if n == node and p == package]


@pytest.fixture(autouse=True)
def session_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests here cut, stall and kill a child's session connection (the
    proxy's plans go by connection index), so every node they add fetches
    in its session (``lane_min`` 0); ``test_lanes.py`` puts lanes through
    the same faults."""
    original = Deployment.add_node

    def add_node(self: Deployment, name: str, role: Role, parent: tuple[str, int]) -> NodeConfig:
        set_option(original(self, name, role, parent).home, lane_min=0)
        cfg = self.configs[name] = NodeConfig.load(self.root / name, **FAST)
        return cfg

    monkeypatch.setattr(Deployment, "add_node", add_node)


@pytest.fixture
def fetch_log(monkeypatch: pytest.MonkeyPatch) -> FetchLog:
    fetches = FetchLog()
    original = transfer_mod.receive

    async def recording(
        session: Any, router: Any, dl: Any, timeout: float, node: str, *rest: Any
    ) -> None:
        fetches.starts.append((node, dl.manifest.id, dl.verified))
        if fetches.on_start is not None:
            fetches.on_start()
        await original(session, router, dl, timeout, node, *rest)

    original_lane = lane_mod.receive_lane

    async def recording_lane(
        address: Any, ctx: Any, hello: Any, parent: str, dl: Any, timeout: float, node: str,
        *rest: Any,
    ) -> None:  # fmt: skip
        fetches.starts.append((node, dl.manifest.id, dl.verified))
        fetches.lanes.append((node, dl.manifest.id, dl.verified))
        if fetches.on_start is not None:
            fetches.on_start()
        await original_lane(address, ctx, hello, parent, dl, timeout, node, *rest)

    monkeypatch.setattr(fetcher_mod, "receive", recording)
    monkeypatch.setattr(fetcher_mod, "receive_lane", recording_lane)
    return fetches


def verified_prefix(path: Path, m: Manifest) -> int:
    """Bytes of whole leading chunks of ``path`` that match the manifest."""
    good = 0
    with path.open("rb") as f:
        for index, digest in enumerate(m.chunks):
            data = f.read(m.chunk_length(index))
            if hashlib.sha256(data).digest() != digest:
                break
            good += len(data)
    return good


def chunk_ends(trace: RecordTracker, chunk_size: int) -> list[int]:
    """Wire offsets (in one proxied direction) where each whole chunk's last
    TLS record ends: a chunk is ``chunk_size / 16 KiB`` full records, sent
    after its own small header record."""
    per_chunk = chunk_size // TLS_RECORD
    full = [e for e, s in zip(trace.ends, trace.sizes, strict=True) if s == FULL_RECORD]
    return full[per_chunk - 1 :: per_chunk]


def chunks_delivered(trace: RecordTracker, chunk_size: int, upto: int) -> int:
    return sum(1 for e in chunk_ends(trace, chunk_size) if e <= upto)


def payload_delivered(trace: RecordTracker, upto: int) -> int:
    """Package bytes in the whole full-size TLS records among the first
    ``upto`` wire bytes (a torn record cannot be decrypted, so it counts 0)."""
    full = zip(trace.ends, trace.sizes, strict=True)
    return TLS_RECORD * sum(1 for e, size in full if size == FULL_RECORD and e <= upto)


# -- subprocess daemons ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Daemon:
    """``rdsd run --home HOME`` as a subprocess we may SIGKILL and restart."""

    home: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: asyncio.subprocess.Process | None = None
    starts: int = 0

    @property
    def log(self) -> Path:
        return self.home / "daemon.log"

    async def start(
        self, preexec_fn: Callable[[], None] | None = None, timeout: float = 15.0
    ) -> None:
        assert self.proc is None or self.proc.returncode is not None
        self.starts += 1
        out = self.home / f"stdout-{self.starts}.txt"
        env = {**os.environ, **self.env, "PYTHONPATH": str(REPO)}
        with out.open("wb") as stdout, self.log.open("ab") as stderr:
            self.proc = await asyncio.create_subprocess_exec(
                *rdsd_cmd(),
                "run",
                "--home",
                str(self.home),
                "--log-format",
                "json",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env=env,
                cwd=REPO,
                preexec_fn=preexec_fn,
            )
        proc = self.proc

        def ready() -> bool:
            if proc.returncode is not None:
                raise AssertionError(f"daemon {self.home.name} exited: {self.tail()}")
            text = out.read_text()
            return "listening on" in text or "running" in text

        await wait_until(ready, timeout, 0.02, f"daemon {self.home.name} to start")

    async def kill(self, sig: int = signal.SIGKILL) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def stop(self) -> None:
        await self.kill(signal.SIGTERM)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text().splitlines()[-n:])
        except FileNotFoundError:
            return ""


@contextlib.asynccontextmanager
async def daemons(*ds: Daemon) -> AsyncIterator[None]:
    """Make sure every daemon is gone when the test ends, whatever happened."""
    try:
        yield
    finally:
        for d in ds:
            await d.kill()


async def cli(*args: str, timeout: float = 20.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *rdsd_cmd(),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def fix_port(home: Path) -> tuple[str, int]:
    """Give a relay or server a fixed port, so its children find it again
    after a restart."""
    address = ("127.0.0.1", free_port())
    set_option(home, listen=address)
    return address


# == 0. the proxy itself ==========================================================================


async def test_faultproxy_plans_apply_per_connection() -> None:
    """Each connection gets its own plan by index; bytes are counted per
    direction; nothing but 127.0.0.1 is ever a target."""
    payload = random.Random(7).randbytes(5000)
    heard: list[bytes] = []

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            heard.append(await reader.readexactly(5))
            writer.write(payload)
            await writer.drain()
            await reader.read()  # until the other side goes
        writer.close()

    async def fetch(address: tuple[str, int]) -> bytes:
        reader, writer = await asyncio.open_connection(*address)
        got = bytearray()
        try:
            writer.write(b"hello")
            await writer.drain()
            async with asyncio.timeout(5):
                while chunk := await reader.read(65536):
                    got += chunk
                    if len(got) == len(payload):
                        break
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()
        return bytes(got)

    with pytest.raises(ValueError):
        FaultProxy(("10.0.0.1", 80))
    server = await asyncio.start_server(target, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    plans = {
        0: [cut(1000)],
        1: [reset(500)],
        2: [split(100), delay(0.001)],
        3: [stall(2000)],
    }
    try:
        async with FaultProxy(("127.0.0.1", port), plans=plans) as proxy:
            assert await fetch(proxy.address) == payload[:1000]
            got = await fetch(proxy.address)
            assert payload.startswith(got) and len(got) <= 500
            assert await fetch(proxy.address) == payload
            reader, writer = await asyncio.open_connection(*proxy.address)
            try:
                writer.write(b"hello")
                async with asyncio.timeout(5):
                    assert await reader.readexactly(2000) == payload[:2000]
                with pytest.raises(TimeoutError):  # held back, connection open
                    async with asyncio.timeout(0.3):
                        await reader.read(1)
                assert proxy.connections[3].stalled
                proxy.connections[3].unstall()
                async with asyncio.timeout(5):
                    assert await reader.readexactly(3000) == payload[2000:]
            finally:
                writer.close()
            assert await fetch(proxy.address) == payload  # index 4: the default, pass
            counts = [(c.forwarded[UP], c.forwarded[DOWN]) for c in proxy.connections]
            fired = [c.fired.kind if c.fired else None for c in proxy.connections]
    finally:
        server.close()
    assert counts == [(5, 1000), (5, 500), (5, 5000), (5, 5000), (5, 5000)]
    assert fired == ["cut", "reset", None, "stall", None]
    assert heard == [b"hello"] * 5


# == 1. upstream hops resume ======================================================================

# The default chunk size, which the design's "at most one chunk re-sent" target
# is stated in. 16 chunks: cuts at 10, 50 and 90 % fall on chunks 2, 8 and 15.
SWEEP_CHUNK = 1 * MiB
SWEEP_PAYLOAD = 16 * MiB


@dataclass
class CutResult:
    """One cut transfer, in package bytes unless said otherwise."""

    label: str
    state: str
    size: int
    served: int  # by the parent to this child, over all attempts
    served_before: int  # ... of which before the resumed fetch began
    served_at_cut: int  # ... of which when the proxy cut
    resumed_from: list[int]  # the offset of each fetch attempt
    cut_at: int = 0  # wire bytes forwarded to the child before the cut
    delivered: int = 0  # whole chunks that reached the child before it
    received: int = 0  # package bytes in whole TLS records that reached it

    @property
    def resent(self) -> int:
        return self.served - self.size

    @property
    def served_after(self) -> int:
        return self.served - self.served_before

    @property
    def after_cut(self) -> int:
        """Counted as sent after the connection was already cut."""
        return self.served_before - self.served_at_cut

    @property
    def lost(self) -> int:
        """Sent over the cut connection but never delivered: what sat in the
        parent's TLS transport buffer (measured: up to ~4 MiB) and kernel send
        buffer (autotuned up to 4 MiB on loopback) at the cut, plus what was
        written into the dead connection after it."""
        return self.served_before - self.received

    @property
    def torn(self) -> int:
        """Had arrived, yet was asked for again: the torn last chunk."""
        return self.received - self.resumed_from[-1]


def cut_plans(ends: list[int], n_chunks: int, seed: int) -> list[tuple[str, Fault, int | None]]:
    """(label, fault, whole chunks expected through) around 10, 50 and 90 %.
    ``ends`` are the wire offsets where whole chunks end in a clean run."""
    rng = random.Random(seed)
    plans: list[tuple[str, Fault, int | None]] = []
    for pct in (10, 50, 90):
        k = max(1, round(n_chunks * pct / 100))
        boundary = ends[k - 1]
        plans += [
            # The first TLS record end from 2000 B ahead: the one closing chunk k.
            (f"{pct}% at boundary {k}", cut(boundary - 2000, at_record_end=True), k),
            (f"{pct}% boundary {k} - 1000 B", cut(boundary - 1000), k - 1),
            (f"{pct}% boundary {k} + 1000 B", cut(boundary + 1000), k),
        ]
        lo, hi = ends[max(0, k - 3)], ends[min(len(ends) - 1, k + 1)]
        plans.append((f"{pct}% random, RST", reset(rng.randrange(lo, hi)), None))
    return plans


async def sweep(
    dep: Deployment,
    server: Node,
    name: str,
    pid: str,
    job_type: str,
    final: str,
    fetch_log: FetchLog,
    after_each: Callable[[str], Awaitable[None]],
) -> list[CutResult]:
    """Run ``job_type`` of ``pid`` to ``name`` once through a clean proxy (to
    learn where chunks end on the wire), then once per cut plan."""
    assert server.downlinks is not None
    served = traffic(server).served
    m = manifest_of(dep, pid)

    async def once(label: str, plan: Sequence[Fault]) -> tuple[CutResult, FaultProxy]:
        before = served[name]
        at_start: list[int] = []
        at_cut: list[int] = []
        fetch_log.on_start = lambda: at_start.append(served[name] - before)

        def on_fire(_: object) -> None:
            at_cut.append(served[name] - before)

        # A 256 KiB window at the proxy, like a network path: the proxy's own
        # buffer should not hide megabytes in flight.
        async with FaultProxy(
            server.address, plans={0: plan}, buffer=256 * KiB, on_fire=on_fire
        ) as proxy:
            cfg = replace(dep.configs[name], parent=proxy.address)
            fetch_log.starts.clear()
            with dep.admin() as admin:
                async with running(cfg):
                    await wait_child(server, name)
                    job = admin.create_job(job_type, pid, [name])
                    state = await wait_state(admin, job, name, {final, "failed"}, 30)
                await wait_child(server, name, present=False)
            assert state == final, f"{label}: ended {state}: {dest_of(admin, job, name)}"
            await after_each(job)
        total = served[name] - before
        first = proxy.connections[0]
        r = CutResult(
            label=label,
            state=state,
            size=m.size,
            served=total,
            served_before=at_start[-1],
            served_at_cut=at_cut[0] if at_cut else total,
            resumed_from=fetch_log.offsets(name, pid),
        )
        if first.fired is not None:
            assert first.fired_at is not None
            trace = first.records[DOWN]
            r.cut_at = first.fired_at
            r.delivered = chunks_delivered(trace, m.chunk_size, r.cut_at)
            r.received = payload_delivered(trace, r.cut_at)
        return r, proxy

    clean, proxy = await once("no cut", [])
    assert clean.resumed_from == [0] and clean.resent == 0
    ends = chunk_ends(proxy.connections[0].records[DOWN], m.chunk_size)
    assert len(ends) >= len(m.chunks) - 1, "the record trace should show every whole chunk"

    results = []
    for label, fault, expect in cut_plans(ends, len(m.chunks), seed=len(name)):
        r, proxy = await once(label, [fault])
        assert proxy.connections[0].fired == fault, f"{label}: the fault never fired"
        results.append(r)
        if expect is not None:
            assert r.delivered == expect, f"{label}: the cut fell elsewhere ({r.delivered})"
        # One resume, from exactly the last whole chunk that had arrived, so
        # less than a chunk of what arrived is asked for again ...
        assert r.resumed_from == [0, r.delivered * m.chunk_size], (label, r.resumed_from)
        assert 0 <= r.torn < m.chunk_size, f"{label}: {r.torn} bytes asked for again"
        # ... and after it exactly the rest is sent: beyond the bytes lost in
        # flight at the cut, the package went over the hop once.
        assert r.served_after == m.size - r.resumed_from[-1], (label, r)
        assert r.resent - r.lost == r.torn <= 2 * m.chunk_size
    print_table(f"{server.cfg.name} -> {name}, cut in that direction", results, m.chunk_size)
    return results


def print_table(title: str, results: list[CutResult], chunk: int) -> None:
    print(f"\n{title}: package {results[0].size} B, chunk {chunk} B")
    print(
        "re-sent = served - size = lost (buffered in the parent's transport and socket at "
        "the cut, or written after it) + torn (had arrived, asked for again)"
    )
    print(
        f"{'cut':<26}{'wire B':>10}{'chunks in':>10}{'resumed at':>12}{'served B':>11}"
        f"{'re-sent B':>11}{'chunks':>7}{'lost B':>10}{'after cut':>10}{'torn B':>9}"
    )
    for r in results:
        print(
            f"{r.label:<26}{r.cut_at:>10}{r.delivered:>10}{r.resumed_from[-1]:>12}"
            f"{r.served:>11}{r.resent:>11}{r.resent / chunk:>7.2f}{r.lost:>10}"
            f"{r.after_cut:>10}{r.torn:>9}"
        )


@pytest.mark.slow
async def test_upstream_resume_sweep_server_to_relay(
    deployment: Deployment, fetch_log: FetchLog
) -> None:
    set_server_option(deployment, chunk_size=SWEEP_CHUNK)
    pid = add_package(deployment, "big", SWEEP_PAYLOAD)
    async with running(deployment.server) as (server,):
        cfg = deployment.add_node("relay1", Role.RELAY, server.address)
        deployment.configs["relay1"] = replace(cfg, idle_timeout=3.0, ping_interval=1.0)
        relay_home = cfg.home

        async def check_and_forget(job: str) -> None:
            store = store_of(relay_home)
            store.verify(pid)  # intact, or this raises
            assert not list(store.partial_dir.iterdir())
            store.delete(pid)  # so the next job fetches it again

        results = await sweep(
            deployment,
            server,
            "relay1",
            pid,
            "transfer",
            "stored",
            fetch_log,
            check_and_forget,
        )
    assert len(results) == 12


@pytest.mark.slow
async def test_upstream_resume_sweep_server_to_client(
    deployment: Deployment, fetch_log: FetchLog
) -> None:
    set_server_option(deployment, chunk_size=SWEEP_CHUNK)
    pid = add_package(deployment, "big", SWEEP_PAYLOAD)
    want = sha256_file(deployment.root / "src-big-1.0" / "payload.bin")
    async with running(deployment.server) as (server,):
        cfg = deployment.add_node("client1", Role.CLIENT, server.address)
        deployment.configs["client1"] = replace(cfg, idle_timeout=3.0, ping_interval=1.0)

        async def check(job: str) -> None:
            assert sha256_file(extracted_payload(cfg.home, job, pid)) == want

        results = await sweep(
            deployment, server, "client1", pid, "install", "installed", fetch_log, check
        )
    assert len(results) == 12


# == 2. relay -> client restarts from byte zero ===================================================


async def test_downstream_cut_restarts_from_zero(
    deployment: Deployment, fetch_log: FetchLog
) -> None:
    set_server_option(deployment, chunk_size=256 * KiB)
    pid = add_package(deployment, "tool", 6 * MiB)
    m = manifest_of(deployment, pid)
    want = sha256_file(deployment.root / "src-tool-1.0" / "payload.bin")
    async with running(deployment.server) as (server,):
        relay_cfg = deployment.add_node("relay1", Role.RELAY, server.address)
        async with running(relay_cfg) as (relay,):
            assert relay.downlinks is not None
            async with FaultProxy(relay.address, plans={0: [cut(m.size // 2)]}) as proxy:
                c1 = deployment.add_node("client1", Role.CLIENT, proxy.address)
                with deployment.admin() as admin:
                    async with running(c1):
                        await wait_child(relay, "client1")
                        await wait_until(lambda: routed(admin, "client1", "relay1"))
                        job = admin.create_job("transfer", pid, ["relay1"])
                        assert await wait_state(admin, job, "relay1", {"stored", "failed"}) == (
                            "stored"
                        )
                        job = admin.create_job("install", pid, ["client1"])
                        state = await wait_state(admin, job, "client1", {"installed", "failed"})
                        assert state == "installed", dest_of(admin, job, "client1")
            first = proxy.connections[0]
            cut_at = first.fired_at
            assert cut_at is not None, "the cut never happened"
            before_cut = payload_delivered(first.records[DOWN], cut_at)
            served = traffic(relay).served["client1"]
    # The relay had it cached: the server sent it once, to the relay.
    assert traffic(server).served["relay1"] == m.size
    assert before_cut > m.size // 3
    # Below a relay every attempt starts over, and the whole package went again.
    assert fetch_log.offsets("client1", pid) == [0, 0]
    assert served >= m.size + before_cut, (served, m.size, before_cut)
    assert sha256_file(extracted_payload(c1.home, job, pid)) == want
    print(
        f"\nrelay -> client cut at {cut_at} wire B: {before_cut} B had arrived, "
        f"relay served {served} B for a {m.size} B package"
    )


# == 3. a fetch notices a lost link at once =======================================================


async def test_cut_with_chunks_queued_resumes_promptly(
    deployment: Deployment, fetch_log: FetchLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: FetchRouter.session_lost once woke only fetches with an
    empty queue, so a fetch with chunks still queued at the cut waited the
    whole idle timeout before it resumed."""
    set_server_option(deployment, chunk_size=256 * KiB)
    pid = add_package(deployment, "tool", 4 * MiB)
    m = manifest_of(deployment, pid)
    # A slow disk on the receiving side, so chunks queue up behind it.
    slow_write = download_mod.Download._write

    def slow(self: Any, *args: Any) -> None:
        time.sleep(0.03)
        slow_write(self, *args)

    monkeypatch.setattr(download_mod.Download, "_write", slow)
    starts: list[float] = []
    fetch_log.on_start = lambda: starts.append(time.monotonic())
    async with running(deployment.server) as (server,):
        cfg = deployment.add_node("relay1", Role.RELAY, server.address)
        async with FaultProxy(server.address, plans={0: [cut(m.size // 4)]}) as proxy:
            relay_cfg = replace(cfg, parent=proxy.address, idle_timeout=4.0, ping_interval=1.0)
            async with running(relay_cfg):
                with deployment.admin() as admin:
                    job = admin.create_job("transfer", pid, ["relay1"])
                    await proxy.wait_connections(1)
                    first = proxy.connections[0]
                    await asyncio.wait_for(first.triggered.wait(), 10)
                    cut_time = time.monotonic()
                    assert await wait_state(admin, job, "relay1", {"stored", "failed"}) == "stored"
    assert len(starts) == 2
    gap = starts[1] - cut_time
    print(f"\nresumed {gap:.2f}s after the cut (idle timeout 4s)")
    assert gap < 2.0, f"the resume waited {gap:.1f}s for the idle timeout"


# == 4. a partial download survives kill -9 =======================================================


async def test_partial_survives_kill9_and_garbled_tail(deployment: Deployment) -> None:
    chunk = 256 * KiB
    set_server_option(deployment, chunk_size=chunk)
    pid = add_package(deployment, "tool", 8 * MiB)
    m = manifest_of(deployment, pid)
    async with running(deployment.server) as (server,):
        assert server.downlinks is not None
        served = traffic(server).served
        # The first connection crawls (16 KiB writes, 5 ms apart); later ones pass.
        slow = [delay(0.005, DOWN), split(16 * KiB, DOWN)]
        async with FaultProxy(server.address, plans={0: slow}) as proxy:
            cfg = deployment.add_node("relay1", Role.RELAY, proxy.address)
            relay = Daemon(cfg.home)
            async with daemons(relay):
                await relay.start()
                await wait_child(server, "relay1")
                with deployment.admin() as admin:
                    job = admin.create_job("transfer", pid, ["relay1"])
                    first = await proxy.wait_connections(1)
                    await wait_until(
                        lambda: first.forwarded[DOWN] >= m.size // 2, 30, 0.005, "half the package"
                    )
                    await relay.kill(signal.SIGKILL)
                    killed_at = first.forwarded[DOWN]
                    await wait_child(server, "relay1", present=False)
                    await wait_until(lambda: not server.downlinks.children, 5)  # type: ignore[union-attr]
                    await asyncio.sleep(0.2)
                    baseline = served["relay1"]

                    part = cfg.home / "store" / "partial" / f"{pid}.part"
                    assert part.exists(), "the verified prefix must survive the kill"
                    assert (part.parent / f"{pid}.env").exists()
                    length = part.stat().st_size
                    good = verified_prefix(part, m)
                    # Whole chunks only, and no more than had arrived.
                    assert 0 < good < killed_at and good % chunk == 0
                    # Garble the tail of what was verified (junk over its last
                    # 1000 bytes) and add 5000 junk bytes at the end of the file.
                    with part.open("r+b") as f:
                        f.seek(good - 1000)
                        f.write(os.urandom(1000))
                        f.seek(0, os.SEEK_END)
                        f.write(os.urandom(5000))
                    prefix = good - chunk

                    await relay.start()
                    state = await wait_state(admin, job, "relay1", {"stored", "failed"}, 30)
                    assert state == "stored", dest_of(admin, job, "relay1")
                    await relay.stop()
    again = served["relay1"] - baseline
    print(
        f"\nkill -9 at {killed_at} wire B: partial file {length} B "
        f"({'whole chunks' if length % chunk == 0 else 'preallocated, cut back on restart'}) "
        f"holding {good} B of verified chunks; after garbling its tail {prefix} B verify; "
        f"served again {again} B of {m.size}"
    )
    # Resumed from the verified prefix: only the rest went over the hop again.
    assert again == m.size - prefix, (again, m.size, prefix)
    pkg = cfg.home / "store" / f"{pid}.pkg"
    assert sha256_file(pkg) == m.sha256.hex()
    store_of(cfg.home).verify(pid)
    assert not list((cfg.home / "store" / "partial").iterdir())


# == 5. kill -9 at random moments =================================================================


@dataclass
class KillTally:
    points: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    lost_reports: list[str] = field(default_factory=list)
    other_failures: list[str] = field(default_factory=list)
    interrupted: dict[str, int] = field(default_factory=dict)


def install_runs(out: Path, node: str) -> list[str]:
    path = out / f"runs-{node}.txt"
    return path.read_text().split() if path.exists() else []


@pytest.mark.slow
async def test_kill9_at_random_moments(deployment: Deployment, tmp_path: Path) -> None:
    seed = int(os.environ.get("RDSD_KILL_SEED", "20261121"))
    rng = random.Random(seed)
    out = tmp_path / "installed"
    out.mkdir()
    set_server_option(deployment, chunk_size=256 * KiB)
    server_addr = fix_port(deployment.server.home)
    pids = [add_package(deployment, f"pkg{i}", 3 * MiB, script=COUNT_SCRIPT) for i in range(3)]
    tally = KillTally()
    # Slow hops (32 KiB writes, 2 ms apart: ~15 MB/s), so kills land mid-transfer too.
    slow = [delay(0.002, DOWN), split(32 * KiB, DOWN)]
    async with FaultProxy(server_addr, default=slow) as up:
        relay_cfg = deployment.add_node("relay1", Role.RELAY, up.address)
        relay_addr = fix_port(relay_cfg.home)
        async with FaultProxy(relay_addr, default=slow) as down:
            client_cfg = deployment.add_node("client1", Role.CLIENT, down.address)
            env = {"RDSD_TEST_OUT": str(out), "RDSD_TEST_SLEEP": "0.8"}
            nodes = {
                "server": Daemon(deployment.server.home),
                "relay1": Daemon(relay_cfg.home),
                "client1": Daemon(client_cfg.home, env=env),
            }
            homes = [d.home for d in nodes.values()]
            async with daemons(*nodes.values()):
                for d in nodes.values():
                    await d.start()
                with deployment.admin() as admin:
                    await wait_until(lambda: routed(admin, "client1", "relay1"), 15)
                    jobs: list[str] = []
                    n_kills = rng.randint(6, 10)
                    create_at = {0: 0, 1: n_kills // 3, 2: 2 * n_kills // 3}
                    for point in range(n_kills):
                        for i, at in create_at.items():
                            if at == point:
                                jobs.append(admin.create_job("install", pids[i], ["client1"]))
                        await asyncio.sleep(rng.uniform(0.1, 1.2))
                        victim = rng.choice(list(nodes))
                        if rng.random() < 0.5:
                            # A kill of the client while an install command runs.
                            victim = "client1"
                            with job_db(client_cfg.home) as cdb:
                                with contextlib.suppress(AssertionError):
                                    await wait_until(
                                        lambda cdb=cdb: any(  # type: ignore[misc]
                                            (d := cdb.dest(j, "client1")) is not None
                                            and d.state == "installing"
                                            for j in jobs
                                        ),
                                        3,
                                        0.02,
                                    )
                                await asyncio.sleep(rng.uniform(0.0, 0.6))
                        states = {j: dest_of(admin, j, "client1")["state"] for j in jobs}
                        await nodes[victim].kill(signal.SIGKILL)
                        tally.points.append(f"{victim} [{' '.join(states.values())}]")
                        for home in homes:
                            tally.corrupt += corrupt_packages(home)
                        await asyncio.sleep(rng.uniform(0.0, 0.3))
                        await nodes[victim].start()

                    async def settle() -> bool:
                        for job in jobs:
                            d = dest_of(admin, job, "client1")
                            if d["state"] == "failed":
                                if "interrupted" in d["detail"]:
                                    tally.interrupted[job] = tally.interrupted.get(job, 0) + 1
                                else:
                                    tally.other_failures.append(f"{job}: {d['detail']}")
                                code, _, err = await cli(
                                    "job", "retry", job, "--home", str(deployment.server.home)
                                )
                                assert code == 0, err
                        return all(
                            dest_of(admin, j, "client1")["state"] == "installed" for j in jobs
                        )

                    try:
                        async with asyncio.timeout(60):
                            while True:
                                if await settle():
                                    break
                                await asyncio.sleep(0.1)
                    except TimeoutError:
                        raise AssertionError(
                            f"jobs did not finish: "
                            f"{[dest_of(admin, j, 'client1') for j in jobs]}\n"
                            + "\n".join(f"{n}: {d.tail()}" for n, d in nodes.items())
                        ) from None

                    # Every report arrives: the server says what the client says.
                    with job_db(client_cfg.home) as cdb:
                        await wait_until(lambda: not cdb.outbox(), 15, what="client outbox")
                        for job in jobs:
                            mine = cdb.dest(job, "client1")
                            theirs = dest_of(admin, job, "client1")
                            if mine is None or mine.state != theirs["state"]:
                                tally.lost_reports.append(f"{job}: client {mine}, server {theirs}")
                    with job_db(relay_cfg.home) as rdb:
                        await wait_until(lambda: not rdb.outbox(), 15, what="relay outbox")
                for home in homes:
                    tally.corrupt += corrupt_packages(home)
    runs = install_runs(out, "client1")
    for job in jobs:
        # A kill -9 never interrupts an install: its supervisor finishes it and
        # the restarted daemon adopts the outcome. Exactly one run per job.
        n = runs.count(job)
        if n != 1:
            tally.duplicates.append(
                f"{job} ran {n} times, {tally.interrupted.get(job, 0)} interrupted"
            )
    print(
        f"\nkill -9 (seed {seed}): {len(tally.points)} kill points, victim [job states the "
        "server saw]: "
        + "; ".join(tally.points)
        + f"\n  interrupted installs retried: {sum(tally.interrupted.values())}; "
        f"corrupt files: {len(tally.corrupt)}; duplicate installs: {len(tally.duplicates)}; "
        f"lost reports: {len(tally.lost_reports)}; other failures: {len(tally.other_failures)}"
    )
    assert 6 <= len(tally.points) <= 10
    assert not tally.corrupt, tally.corrupt
    assert not tally.duplicates, tally.duplicates
    assert not tally.lost_reports, tally.lost_reports
    assert not tally.other_failures, tally.other_failures
    assert not tally.interrupted, tally.interrupted
    assert all(runs.count(job) == 1 for job in jobs)


# == 6. reports survive a dead server; repeats change nothing =====================================


def dest_row(db_path: Path, job: str, node: str) -> tuple[Any, ...]:
    """Everything stored about one destination, straight from SQLite."""
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        row = db.execute(
            "SELECT state, detail, updated, origin, seq, attempts, generation FROM dests "
            "WHERE job=? AND node=?",
            (job, node),
        ).fetchone()
    assert row is not None
    return tuple(row)


async def test_reports_survive_server_kill9_and_repeats_change_nothing(
    deployment: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "installed"
    out.mkdir()
    monkeypatch.setenv("RDSD_TEST_OUT", str(out))
    monkeypatch.setenv("RDSD_TEST_SLEEP", "1.5")
    server_addr = fix_port(deployment.server.home)
    pid = add_package(deployment, "tool", 200 * KiB, script=COUNT_SCRIPT)
    server = Daemon(deployment.server.home)
    c1 = deployment.add_node("client1", Role.CLIENT, server_addr)
    async with daemons(server):
        await server.start()
        async with running(c1) as (client,):
            with deployment.admin() as admin:
                job = admin.create_job("install", pid, ["client1"])
                # The job arrived and the package with it: the install runs ...
                await wait_until(
                    lambda: (
                        (d := client.db.dest(job, "client1")) is not None
                        and d.state == "installing"
                    ),
                    15,
                    what="client1 installing",
                )
                # ... when the server dies; the client finishes alone.
                await server.kill(signal.SIGKILL)
                await wait_until(
                    lambda: client.db.dest(job, "client1").state == "installed",  # type: ignore[union-attr]
                    15,
                    what="client1 installed",
                )
                pending = [r for r in client.db.outbox() if r.job == job]
                assert any(r.state == "installed" for r in pending), pending
                assert dest_of(admin, job, "client1")["state"] != "installed"

                await server.start()
                assert await wait_state(admin, job, "client1", {"installed", "failed"}, 15) == (
                    "installed"
                )
                await wait_until(lambda: not client.db.outbox(), 10, what="outbox acked")
                mine = client.db.dest(job, "client1")
                assert mine is not None
                seq = dest_row(c1.paths.db, job, "client1")[4]
                final_report = Report(
                    report_id=f"client1:{seq}",
                    job=job,
                    node="client1",
                    state="installed",
                    seq=seq,
                    detail=mine.detail,
                    package=pid,
                    time=mine.updated,
                    origin="client1",
                )
                stale = replace(
                    final_report,
                    report_id=f"client1:{final_report.seq - 1}",
                    seq=final_report.seq - 1,
                    state="transferring",
                )
                before = dest_row(deployment.server.paths.db, job, "client1")
                assert before[0] == "installed" and before[4] == final_report.seq
                raw = await RawChild.connect(server_addr, c1.home)
                try:
                    await raw.handshake("client1", purpose="query")
                    for rep in (final_report, final_report, stale):
                        await raw.send(raw.sign(rep))
                        ack = await raw.recv()
                        assert getattr(ack, "report_id", None) == rep.report_id, ack
                finally:
                    await raw.close()
                assert dest_row(deployment.server.paths.db, job, "client1") == before
        await server.stop()
    assert install_runs(out, "client1") == [job]

    # The same through the job database: applied once, then a no-op.
    copy = tmp_path / "copy.db"
    with (
        contextlib.closing(sqlite3.connect(deployment.server.paths.db)) as src,
        contextlib.closing(sqlite3.connect(copy)) as dst,
    ):
        src.backup(dst)
    newer = replace(
        final_report,
        report_id=f"client1:{final_report.seq + 1}",
        seq=final_report.seq + 1,
        detail="again",
    )
    db = JobDB(copy)
    try:
        assert db.apply_report(newer, forward=False) is Applied.APPLIED
        once = dest_row(copy, job, "client1")
        assert db.apply_report(newer, forward=False) is Applied.REPEAT
        assert db.apply_report(final_report, forward=False) is Applied.REPEAT
        assert dest_row(copy, job, "client1") == once
        assert db.installed() == {"client1": [pid]}
    finally:
        db.close()


# == 7. disk full =================================================================================


async def test_disk_full_fails_cleanly_and_retry_installs(
    deployment: Deployment, tmp_path: Path
) -> None:
    limit = 8 * MiB
    out = tmp_path / "installed"
    out.mkdir()
    small = add_package(deployment, "small", 300 * KiB)
    big = add_package(deployment, "big", 16 * MiB, script=COUNT_SCRIPT)
    async with running(deployment.server) as (server,):
        cfg = deployment.add_node("client1", Role.CLIENT, server.address)
        client = Daemon(cfg.home, env={"RDSD_TEST_OUT": str(out)})

        def limited() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        async with daemons(client):
            await client.start(preexec_fn=limited)
            await wait_child(server, "client1")
            with deployment.admin() as admin:
                offer = admin.create_job("offer", small, ["client1"])
                assert await wait_state(admin, offer, "client1", {"offered", "failed"}) == (
                    "offered"
                )
                job = admin.create_job("install", big, ["client1"])
                assert await wait_state(admin, job, "client1", {"installed", "failed"}) == (
                    "failed"
                )
                detail = dest_of(admin, job, "client1")["detail"]
                print(f"\ndisk full under RLIMIT_FSIZE={limit}: failed with {detail!r}")
                assert any(w in detail.lower() for w in ("disk full", "efbig", "file too large")), (
                    detail
                )
                partial = cfg.home / "store" / "partial"
                assert not [p.name for p in partial.iterdir() if p.name.startswith(big)]
                store = store_of(cfg.home)
                assert store.ids() == [small]
                store.verify(small)  # what it held before is intact
                assert not store.data_path(big).exists()
                assert client.running, "the daemon survives a full disk"

                await client.stop()
                await client.start()  # no limit this time
                await wait_child(server, "client1")
                code, stdout, err = await cli(
                    "job", "retry", job, "--home", str(deployment.server.home)
                )
                assert code == 0, err
                assert "client1" in stdout
                assert await wait_state(admin, job, "client1", {"installed", "failed"}) == (
                    "installed"
                ), dest_of(admin, job, "client1")
                await client.stop()
    assert install_runs(out, "client1") == [job]
    store_of(cfg.home).verify(small)


# == 8. corruption at rest ========================================================================


def flip_bytes(path: Path, offset: int, n: int = 16) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        data = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


async def test_corrupt_relay_cache_is_refetched_from_the_bad_chunk(
    deployment: Deployment, fetch_log: FetchLog
) -> None:
    chunk = 256 * KiB
    set_server_option(deployment, chunk_size=chunk)
    pid = add_package(deployment, "tool", 4 * MiB)
    m = manifest_of(deployment, pid)
    want = sha256_file(deployment.root / "src-tool-1.0" / "payload.bin")
    async with running(deployment.server) as (server,):
        assert server.downlinks is not None
        relay_cfg = deployment.add_node("relay1", Role.RELAY, server.address)
        async with running(relay_cfg) as (relay,):
            c1 = deployment.add_node("client1", Role.CLIENT, relay.address)
            async with running(c1):
                with deployment.admin() as admin:
                    await wait_until(lambda: routed(admin, "client1", "relay1"))
                    job = admin.create_job("transfer", pid, ["relay1"])
                    assert await wait_state(admin, job, "relay1", {"stored", "failed"}) == "stored"
                    assert traffic(server).served["relay1"] == m.size
                    cached = relay_cfg.home / "store" / f"{pid}.pkg"
                    bad = m.size // 2 + 1234
                    flip_bytes(cached, bad)
                    bad_chunk = bad // chunk * chunk
                    job = admin.create_job("install", pid, ["client1"])
                    state = await wait_state(admin, job, "client1", {"installed", "failed"})
                    assert state == "installed", dest_of(admin, job, "client1")
    refetched = traffic(server).served["relay1"] - m.size
    print(f"\ncorrupt byte at {bad}: relay re-fetched {refetched} B from {bad_chunk}")
    assert sha256_file(extracted_payload(c1.home, job, pid)) == want
    assert refetched == m.size - bad_chunk < m.size
    assert fetch_log.offsets("relay1", pid) == [0, bad_chunk]
    store_of(relay_cfg.home).verify(pid)
    assert sha256_file(relay_cfg.home / "store" / f"{pid}.pkg") == m.sha256.hex()


async def test_corrupt_storehouse_fails_the_job_and_installs_nothing(
    deployment: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "installed"
    out.mkdir()
    monkeypatch.setenv("RDSD_TEST_OUT", str(out))
    pid = add_package(deployment, "tool", 2 * MiB, script=COUNT_SCRIPT)
    m = manifest_of(deployment, pid)
    flip_bytes(deployment.server.home / "store" / f"{pid}.pkg", m.size // 2)
    async with running(deployment.server) as (server,):
        c1 = deployment.add_node("client1", Role.CLIENT, server.address)
        async with running(c1):
            with deployment.admin() as admin:
                job = admin.create_job("install", pid, ["client1"])
                state = await wait_state(admin, job, "client1", {"installed", "failed"}, 30)
                detail = dest_of(admin, job, "client1")["detail"]
    print(f"\ncorrupt storehouse: {state}: {detail}")
    assert state == "failed"
    assert "digest" in detail, detail
    assert install_runs(out, "client1") == []
    assert not list(HomePaths(c1.home).work.glob(f"{job}-*"))
    assert not store_of(c1.home).ids()
    # The storehouse cannot fetch it again, so the package stays where it is.
    assert (deployment.server.home / "store" / f"{pid}.pkg").exists()


# == 9. stalled peers and silent connections ======================================================


QUICK: dict[str, Any] = {"idle_timeout": 2.0, "ping_interval": 0.5}


@contextlib.asynccontextmanager
async def stalled_and_healthy(
    dep: Deployment,
) -> AsyncIterator[tuple[Node, Node, FaultProxy, str, str]]:
    """Server (idle timeout 2 s), clientA behind a proxy that stalls the
    server->client direction after 2 MiB, clientB direct; one install job of
    an 8 MiB package for both. Yields once clientA's link has stalled."""
    set_server_option(dep, chunk_size=256 * KiB)
    pid = add_package(dep, "tool", 8 * MiB)
    async with running(replace(dep.server, **QUICK)) as (server,):
        plan = {0: [stall(2 * MiB)]}
        async with FaultProxy(server.address, plans=plan, buffer=256 * KiB) as proxy:
            a = replace(dep.add_node("clientA", Role.CLIENT, proxy.address), **QUICK)
            b = replace(dep.add_node("clientB", Role.CLIENT, server.address), **QUICK)
            async with running(a, b) as (node_a, _):
                await wait_child(server, "clientA")
                await wait_child(server, "clientB")
                with dep.admin() as admin:
                    job = admin.create_job("install", pid, ["clientA", "clientB"])
                first = await proxy.wait_connections(1)
                await asyncio.wait_for(first.triggered.wait(), 15)
                yield server, node_a, proxy, job, pid


async def test_stalled_client_does_not_hold_up_others(
    deployment: Deployment, fetch_log: FetchLog
) -> None:
    async with stalled_and_healthy(deployment) as (server, node_a, proxy, job, pid):
        assert server.downlinks is not None and node_a.uplink is not None
        uplink = node_a.uplink
        stalled_at = time.monotonic()
        session = server.downlinks.children["clientA"].session
        first_session = uplink.session
        with deployment.admin() as admin:
            state = await wait_state(admin, job, "clientB", {"installed", "failed"}, 15)
            assert state == "installed"
            first = proxy.connections[0]
            assert first.stalled and not session.closed
            assert dest_of(admin, job, "clientA")["state"] == "transferring"
            # The stalled session is dropped (by whichever side times out first).
            await wait_until(lambda: session.closed, 10, what="the stalled session dropped")
            dropped = time.monotonic() - stalled_at
            # Let clientA's side finish closing it too before everything stops
            # (test_stalled_client_recovers_on_the_next_connection covers stopping earlier).
            await wait_until(lambda: uplink.session is not first_session, 10)
    print(
        f"\nclientB installed while clientA stalled; clientA's session was dropped "
        f"{dropped:.1f}s after the stall (idle timeout 2s): {session.close_reason}"
    )
    assert dropped < 3 * QUICK["idle_timeout"]
    assert fetch_log.offsets("clientB", pid) == [0]


async def test_stalled_client_recovers_on_the_next_connection(
    deployment: Deployment, fetch_log: FetchLog
) -> None:
    async with stalled_and_healthy(deployment) as (_, node_a, proxy, job, pid):
        # clientA's own record first: with the link dead its report cannot leave.
        await wait_until(lambda: (d := node_a.db.dest(job, "clientA")) is not None and d.final, 20)
        mine = node_a.db.dest(job, "clientA")
        assert mine is not None and mine.state == "installed", mine
        with deployment.admin() as admin:
            state = await wait_state(admin, job, "clientA", {"installed", "failed"}, 10)
            assert state == "installed", dest_of(admin, job, "clientA")
    assert len(proxy.connections) >= 2 and proxy.connections[1].forwarded[DOWN] > 0
    offsets = fetch_log.offsets("clientA", pid)
    assert offsets[0] == 0 and 0 < offsets[-1] <= 2 * MiB, offsets  # resumed


async def test_silent_connection_is_closed_after_handshake_timeout(
    deployment: Deployment,
) -> None:
    server_cfg = replace(deployment.server, handshake_timeout=1.0)
    c1 = deployment.add_node("client1", Role.CLIENT, ("127.0.0.1", 1))
    async with running(server_cfg) as (server,):
        # Plain TCP that never starts TLS.
        started = time.monotonic()
        reader, writer = await asyncio.open_connection(*server.address)
        try:
            async with asyncio.timeout(5):
                with contextlib.suppress(ConnectionError):
                    assert await reader.read() == b""
        finally:
            writer.close()
        silent_tcp = time.monotonic() - started
        # TLS done, then no HELLO.
        started = time.monotonic()
        raw = await RawChild.connect(server.address, c1.home)
        try:
            assert isinstance(await raw.recv(5), ConnectionClosed | Message)
        finally:
            await raw.close()
        silent_tls = time.monotonic() - started
        assert server.downlinks is not None and not server.downlinks.children
    print(f"\nsilent TCP closed after {silent_tcp:.2f}s, silent TLS after {silent_tls:.2f}s")
    assert 0.8 <= silent_tcp < 3.0
    assert 0.8 <= silent_tls < 3.0


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
    original = download_mod.Download._write

    def slow_then_full(self: download_mod.Download, index: int, offset: int, data: bytes) -> None:
        time.sleep(0.2)
        if self.manifest.name == "big" and index == 2:
            self._broken = True
            raise DiskFull("simulated: no space left on device")
        original(self, index, offset, data)

    monkeypatch.setattr(download_mod.Download, "_write", slow_then_full)
    async with running(deployment.server) as (server,):
        cfg = deployment.add_node("client1", Role.CLIENT, server.address)
        async with running(cfg):
            with deployment.admin() as admin:
                j1 = admin.create_job("install", p_big, ["client1"])
                assert await wait_state(admin, j1, "client1", DONE, 20) == "failed"
                j2 = admin.create_job("install", p_small, ["client1"])
                assert await wait_state(admin, j2, "client1", DONE, 15) == "installed"


def test_cleanup_spares_files_another_process_is_writing(deployment: Deployment) -> None:
    """A command's store clean-up must not delete what a live process writes:
    an archive whose envelope is not yet written is spared while its writer
    holds the store lock (a commit in progress), and is debris at once when
    nobody does (a commit that failed, or a crash)."""
    with deployment.admin() as admin:
        store = admin.store
        store.prepare()
        live = store.root / f".x-1.0.pkg.tmp-{os.getpid()}"
        dead = store.root / ".y-1.0.pkg.tmp-999999999"
        fresh = store.root / "z-1.0.pkg"  # just renamed, envelope not yet written
        for path in (live, dead, fresh):
            path.write_bytes(b"data")
        locker = subprocess.Popen(
            [sys.executable, "-c", HOLD_STORE_LOCK, str(store.lock_path)],
            stdout=subprocess.PIPE,
            stdin=subprocess.PIPE,
        )
        try:
            assert locker.stdout is not None and locker.stdout.readline() == b"locked\n"
            store.prepare()
            assert live.exists() and fresh.exists()
            assert not dead.exists()
        finally:
            locker.communicate(b"", timeout=10)
        store.prepare()  # nobody commits now: no waiting 10 minutes for it
        assert live.exists() and not fresh.exists()


HOLD_STORE_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""
