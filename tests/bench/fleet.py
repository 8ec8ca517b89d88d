#!/usr/bin/env python3
"""Fleet simulator: one job to thousands of clients, through real daemons.

Run from the repository root::

    python tests/bench/fleet.py                      # 10,000 clients under 10 relays
    python tests/bench/fleet.py --clients 1000 --relays 4

One real server daemon and R real relay daemons (``rdsd run``, JSON logs)
run as subprocesses; N simulated clients run in W worker processes
(``--workers``, default 4; each is this file run as ``--worker SPEC``, with
its own uvloop loop) that report their counters to this process as one JSON
line per second on stdout. Each simulated client is genuine on the wire: its
own certificate signed by the deployment's CA and enrolled on the server,
mutual TLS 1.3, HELLO/WELCOME, PINGs like a daemon's uplink, then for the
job: JOB_NOTICE (the envelope is verified), REPORT transferring, FETCH of
the whole package from its relay, REPORT installing and installed, each
signed and kept until acknowledged. What a simulated client does not do is
hash or keep the chunks it receives (it counts their bytes and checks their
offsets; their payloads are received into one shared buffer) or run an
install command: that work happens on a real client's own machine, not on
the relay or the server this bench measures.

Event-loop lag is shown two ways: as each daemon measures it itself (its
``loop.lag`` log events over the job phase, ``[log] lag_period`` set to
``--lag-period``), and from outside: one probe session to the server and one
to each relay, in this process, sends a PING every 100 ms and times the PONG.
On loopback that round trip is the daemon's loop delay plus this process's.

For the job phase the simulator's workers lower their CPU priority
(``--sim-nice``, default 10): they stand for 10,000 machines of their own,
whose CPU a relay never competes with, while here they share two cores
with the daemons (the connection storm runs at equal priority, so their
keepalives keep up). The daemons still share those cores with each other. Beside each process's
CPU-seconds the table gives the time its event-loop thread was runnable but
waiting for a CPU (``/proc/PID/schedstat``): loop lag that is this wait is
the machine's, not a long step in the loop.

Everything listens on 127.0.0.1. Figures go to stdout as one table; progress
to stderr. tests/bench/README.md explains the figures and records runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

THIS = Path(__file__).resolve()
ROOT = THIS.parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from protocol import (  # noqa: E402
    MAX_PAYLOAD,
    Chunk,
    Fetch,
    FetchEnd,
    FetchFail,
    JobNotice,
    Message,
    Ping,
    Pong,
    Report,
    ReportAck,
    Side,
)
from protocol.frames import FrameDecoder  # noqa: E402
from protocol.messages import MessageType  # noqa: E402
from rdsd.admin import Admin, enroll, init_node, init_server  # noqa: E402
from rdsd.claims import ClaimSigner  # noqa: E402
from rdsd.config import HomePaths, NodeConfig  # noqa: E402
from rdsd.domain import DestState, Role  # noqa: E402
from rdsd.errors import SessionClosed  # noqa: E402
from rdsd.net.session import Session, Stream, open_child_session  # noqa: E402
from rdsd.packages.manifest import Envelopes  # noqa: E402
from rdsd.security import Verifier, client_context  # noqa: E402
from rdsd.util.turns import take_turn  # noqa: E402
from tests.bench.bench import (  # noqa: E402
    LOCALHOST,
    Daemons,
    Identity,
    enrolment_rows,
    issue_identities,
    read_listening,
    signed_hello,
    why,
)
from tests.helpers import rdsd_cmd  # noqa: E402

MiB = 1024 * 1024
PROBE_EVERY = 0.1
KEEPALIVE = 15.0  # what a daemon's uplink does by default
HANDSHAKE = 60.0


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- /proc ------------------------------------------------------------------------------


def rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of ``pid`` in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def cpu_seconds(pid: int) -> float:
    parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def cpu_wait_seconds(pid: int) -> float:
    """Seconds the process's main thread (its event loop) has spent runnable
    and waiting for a CPU; NaN where the kernel keeps no such count."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return float("nan")


def cpu_row(rss: float, hwm: float, cpu: float, wait: float) -> str:
    return f"{rss:.0f} ({hwm:.0f}) MiB / {cpu:.1f} s / {wait:.1f} s"


# -- simulated clients ----------------------------------------------------------------------

#: What every simulated client's CHUNK payloads are received into, shared:
#: a simulated client counts a chunk's bytes and checks its offset, it does
#: not hash or store them, so no connection needs a buffer of its own.
SINK = bytearray(MAX_PAYLOAD)
#: Received bytes a simulated client may leave unread before its transport
#: stops reading (a daemon allows 2 MiB; thousands of clients in a few
#: processes falling behind at once would hold that much each).
SIM_READ_AHEAD = 64 * 1024
#: The socket receive buffer of a simulated client. Each read of a TLS
#: connection lands in buffers that grow to the largest read and stay that
#: size for the connection's life (the loop's 256 KiB read buffer, OpenSSL's
#: incoming BIO); with the kernel's default (auto-tuned to megabytes on
#: loopback) a client that received a package held about 500 KiB more.
SIM_RCVBUF = int(os.environ.get("RDSD_FLEET_RCVBUF", 32 * 1024))


class SinkDecoder(FrameDecoder):
    """Receives every CHUNK's payload into ``SINK`` (the message's data is a
    view of it: its length is right, its bytes are someone else's); other
    frames as usual. The bytes on the wire and the TLS work are unchanged."""

    def payload_buffer(self, header: Any, size: int) -> bytearray | memoryview:
        if isinstance(header, list) and header and header[0] == MessageType.CHUNK:
            return memoryview(SINK)[:size]
        return bytearray(size)


class SimStream(Stream):
    """A child's connection protocol that keeps no chunk data (``SinkDecoder``),
    reads little ahead of its reader, and keeps a small socket receive
    buffer (``SIM_RCVBUF``)."""

    def __init__(self) -> None:
        super().__init__(Side.CHILD, read_ahead=SIM_READ_AHEAD)
        self.conn._decoder = SinkDecoder()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and SIM_RCVBUF:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SIM_RCVBUF)


@dataclass
class Tally:
    """What the simulated clients of one worker process count."""

    envelopes: Envelopes
    deadline: float
    connected: int = 0
    installed: int = 0
    notices: int = 0
    gave_up: Counter[str] = field(default_factory=Counter)
    retries: Counter[str] = field(default_factory=Counter)
    lost: Counter[str] = field(default_factory=Counter)
    handshakes: list[float] = field(default_factory=list)  # not yet reported
    lag_max: float = 0.0  # the worker's own loop lag, worst since the last report

    async def watch_lag(self) -> None:
        """How late this worker's loop runs (sleep 100 ms, time the wake-up):
        a simulator that falls behind makes its clients look silent."""
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time()
            await asyncio.sleep(0.1)
            self.lag_max = max(self.lag_max, loop.time() - asked - 0.1)

    def on_connected(self, seconds: float) -> None:
        self.connected += 1
        self.handshakes.append(seconds)

    def snapshot(self) -> dict[str, Any]:
        """Counters so far (handshake latencies: those since the last one),
        as one JSON object for the main process."""
        new, self.handshakes = self.handshakes, []
        lag, self.lag_max = self.lag_max, 0.0
        return {
            "lag_max_ms": round(1000 * lag, 1),
            "connected": self.connected,
            "installed": self.installed,
            "notices": self.notices,
            "handshakes": [round(h, 4) for h in new],
            "retries": dict(self.retries),
            "gave_up": dict(self.gave_up),
            "lost": dict(self.lost),
        }


class SimClient:
    """One simulated client: reconnects with jittered backoff like a daemon's
    uplink; does each job addressed to it once."""

    def __init__(self, ident: Identity, parent: tuple[str, int], ca: Path, fleet: Tally) -> None:
        self.ident = ident
        self.parent = parent
        self.ca = ca
        self.fleet = fleet
        self.seq = 0
        self.done_jobs: set[str] = set()
        self.fetched: set[str] = set()
        self.unacked: dict[str, Report] = {}
        self.fetch: asyncio.Queue[Message] | None = None
        self.session: Session | None = None
        self.ever_connected = False
        self.signer = ClaimSigner.from_file(ident.key)

    async def run(self, stagger: float = 0.0) -> None:
        await asyncio.sleep(stagger)
        delay = 0.2
        ctx = client_context(self.ca, self.ident.cert, self.ident.key)
        hello = signed_hello(self.ident)
        while True:
            t0 = time.perf_counter()
            try:
                session, _ = await open_child_session(
                    *self.parent, ctx, hello, HANDSHAKE, 3 * KEEPALIVE, stream=SimStream
                )
            except Exception as exc:
                if time.monotonic() > self.fleet.deadline:
                    self.fleet.gave_up[why(exc)] += 1
                    return
                self.fleet.retries[why(exc)] += 1
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, 10.0)
                continue
            delay = 0.2
            if not self.ever_connected:
                self.ever_connected = True
                self.fleet.on_connected(time.perf_counter() - t0)
            try:
                await self.serve(session)
            except SessionClosed as exc:
                self.fleet.lost[why(exc)] += 1

    async def serve(self, session: Session) -> None:
        self.session = session
        keep = asyncio.create_task(self._keepalive(session))
        work: set[asyncio.Task[None]] = set()
        try:
            for rep in list(self.unacked.values()):  # the outbox, again on a new session
                await session.send(rep)
            while True:
                msg = await session.recv()
                if not isinstance(msg, Ping):
                    # 2,500 clients hearing of the job in the same moment are
                    # 2,500 readers in one turn: take turns, as a relay's
                    # readers do, so the worker's timers (the keepalive
                    # pings) are not held up for seconds.
                    await take_turn()
                if isinstance(msg, Ping):
                    await session.send(Pong(nonce=msg.nonce))
                elif isinstance(msg, JobNotice):
                    self.fleet.notices += 1
                    if self.ident.name in msg.destinations and msg.job not in self.done_jobs:
                        self.done_jobs.add(msg.job)
                        task = asyncio.create_task(self.do_job(session, msg))
                        work.add(task)
                        task.add_done_callback(work.discard)
                elif isinstance(msg, (Chunk, FetchEnd, FetchFail)):
                    if self.fetch is not None:
                        # Only what the count needs: the data is a view of SINK.
                        await self.fetch.put(msg)
                elif isinstance(msg, ReportAck):
                    acked = self.unacked.pop(msg.report_id, None)
                    if acked is not None and acked.state == DestState.INSTALLED:
                        self.fleet.installed += 1
        finally:
            keep.cancel()
            for task in work:
                task.cancel()
            self.session = None

    async def _keepalive(self, session: Session) -> None:
        nonce = 0
        with contextlib.suppress(SessionClosed):
            await asyncio.sleep(random.uniform(0.2, 1.0) * KEEPALIVE)
            while True:
                nonce += 1
                await session.send(Ping(nonce=nonce))
                await asyncio.sleep(KEEPALIVE)

    async def report(self, session: Session, job: str, state: DestState, pkg: str) -> None:
        self.seq += 1
        name = self.ident.name
        rep = Report(
            report_id=f"{name}:{self.seq}",
            job=job,
            node=name,
            state=state,
            seq=self.seq,
            package=pkg,
            time=time.time(),
            origin=name,
        )
        rep = self.signer.report(rep)  # the node's own signature, as a daemon's
        self.unacked[rep.report_id] = rep
        await session.send(rep)

    async def do_job(self, session: Session, notice: JobNotice) -> None:
        """The job on this session; if the session ends first, the job is
        done again when its notice comes on the next one (a relay sends a
        reconnecting child its open work), as a daemon resumes it."""
        try:
            await self._do_job(session, notice)
        except SessionClosed:
            self._again(notice.job)  # the session's end is counted by run()
        except asyncio.CancelledError:
            self._again(notice.job)
            raise

    def _again(self, job: str) -> None:
        if job not in self.fetched:  # else its reports, resent, finish it
            self.done_jobs.discard(job)
        self.fetch = None

    async def _do_job(self, session: Session, notice: JobNotice) -> None:
        manifest = self.fleet.envelopes.open_for(notice.manifest, notice.package)
        await self.report(session, notice.job, DestState.TRANSFERRING, notice.package)
        while True:
            self.fetch = asyncio.Queue()
            await session.send(Fetch(fetch_id=1, package=notice.package, offset=0))
            got = 0
            while True:
                msg = await self.fetch.get()
                if isinstance(msg, Chunk):
                    if msg.offset != got:
                        raise SessionClosed(f"chunk at {msg.offset}, expected {got}")
                    got += len(msg.data)
                elif isinstance(msg, FetchEnd):
                    break
                else:
                    assert isinstance(msg, FetchFail)
                    got = -1
                    break
            self.fetch = None
            if got == manifest.size:
                self.fetched.add(notice.job)
                break
            self.fleet.retries["fetch refused, asked again"] += 1
            await asyncio.sleep(random.uniform(0.5, 1.5))
        await self.report(session, notice.job, DestState.INSTALLING, notice.package)
        await self.report(session, notice.job, DestState.INSTALLED, notice.package)


# -- worker processes -------------------------------------------------------------------------

REPORT_EVERY = 1.0


def worker_main(spec_path: str) -> int:
    """A worker process: runs its share of the simulated clients in its own
    event loop and writes its counters to stdout as one JSON line per
    second, until its stdin closes (the bench is done, or gone)."""
    spec = json.loads(Path(spec_path).read_text())
    verifier = Verifier(Path(spec["signing_pub"]).read_bytes())
    run_loop(worker_run(spec, verifier))
    return 0


async def worker_run(spec: dict[str, Any], verifier: Verifier) -> None:
    tally = Tally(Envelopes(verifier), deadline=time.monotonic() + spec["connect_limit"])
    ca = Path(spec["ca"])
    clients = [
        SimClient(Identity(name, Path(cert), Path(key)), (host, port), ca, tally)
        for name, cert, key, host, port in spec["clients"]
    ]
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    closed = asyncio.ensure_future(stdin.read())
    spread = float(spec["spread"])
    tasks = [asyncio.create_task(c.run(random.uniform(0, spread))) for c in clients]
    tasks.append(asyncio.create_task(tally.watch_lag()))
    try:
        while not closed.done():
            print(json.dumps(tally.snapshot()), flush=True)
            await asyncio.wait({closed}, timeout=REPORT_EVERY)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Workers:
    """The simulator's worker processes (``fleet.py --worker SPEC``) and
    the sum of what they report."""

    def __init__(self, root: Path, logs: Path) -> None:
        self.root = root
        self.logs = logs
        self.procs: list[asyncio.subprocess.Process] = []
        self.last: list[dict[str, Any]] = []
        self.handshakes: list[float] = []
        self.lags: list[tuple[float, int, float]] = []  # (when, worker, worst ms)
        self.target = 0
        self.all_connected = asyncio.Event()
        self._readers: list[asyncio.Task[None]] = []

    async def start(
        self,
        clients: list[tuple[Identity, tuple[str, int]]],
        n: int,
        common: dict[str, Any],
    ) -> None:
        self.target = len(clients)
        for w in range(n):
            share = clients[w::n]
            spec = dict(common)
            spec["clients"] = [
                [i.name, str(i.cert), str(i.key), host, port] for i, (host, port) in share
            ]
            path = self.root / f"worker-{w}.json"
            path.write_text(json.dumps(spec))
            with (self.logs / f"worker-{w}.log").open("wb") as err:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    str(THIS),
                    "--worker",
                    str(path),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=err,
                    limit=16 * MiB,
                )
            self.procs.append(proc)
            self.last.append({})
            self._readers.append(asyncio.create_task(self._read(w, proc)))

    async def _read(self, w: int, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            snap = json.loads(line)
            self.handshakes += snap.pop("handshakes")
            self.lags.append((time.time(), w, float(snap.pop("lag_max_ms", 0.0))))
            self.last[w] = snap
            if self.connected >= self.target:
                self.all_connected.set()

    def _sum(self, key: str) -> int:
        return sum(int(s.get(key, 0)) for s in self.last)

    def _counter(self, key: str) -> Counter[str]:
        total: Counter[str] = Counter()
        for s in self.last:
            total.update(s.get(key, {}))
        return total

    @property
    def connected(self) -> int:
        return self._sum("connected")

    @property
    def installed(self) -> int:
        return self._sum("installed")

    @property
    def retries(self) -> Counter[str]:
        return self._counter("retries")

    @property
    def gave_up(self) -> Counter[str]:
        return self._counter("gave_up")

    @property
    def lost(self) -> Counter[str]:
        return self._counter("lost")

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    async def stop(self) -> None:
        """Close each worker's stdin (it cancels its clients and exits);
        SIGKILL after 10 s."""
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in self.procs:
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for task in self._readers:
            task.cancel()


class Probe:
    """A session that PINGs every 100 ms and records each PONG's round trip."""

    def __init__(self, name: str, ident: Identity, parent: tuple[str, int], ca: Path) -> None:
        self.name = name
        self.ident = ident
        self.parent = parent
        self.ca = ca
        self.rtts: list[float] = []
        self.mark = 0

    def since_mark(self) -> list[float]:
        return self.rtts[self.mark :]

    async def run(self) -> None:
        ctx = client_context(self.ca, self.ident.cert, self.ident.key)
        hello = signed_hello(self.ident)
        while True:
            try:
                session, _ = await open_child_session(*self.parent, ctx, hello, HANDSHAKE, 60)
                sent: dict[int, float] = {}
                nonce = 0

                async def pinger(s: Session = session, sent: dict[int, float] = sent) -> None:
                    nonlocal nonce
                    while True:
                        nonce += 1
                        sent[nonce] = time.perf_counter()
                        await s.send(Ping(nonce=nonce))
                        await asyncio.sleep(PROBE_EVERY)

                task = asyncio.create_task(pinger())
                try:
                    while True:
                        msg = await session.recv()
                        if isinstance(msg, Pong) and msg.nonce in sent:
                            self.rtts.append(time.perf_counter() - sent.pop(msg.nonce))
                        elif isinstance(msg, Ping):
                            await session.send(Pong(nonce=msg.nonce))
                finally:
                    task.cancel()
            except (SessionClosed, OSError, TimeoutError):
                await asyncio.sleep(0.5)


# -- the run --------------------------------------------------------------------------------


@dataclass
class Setup:
    server: HomePaths
    relays: list[str]
    clients: list[Identity]
    probes: list[Identity]
    package: str
    size: int


def prepare(root: Path, n_clients: int, n_relays: int, pkg_kib: int) -> Setup:
    """The server home, relay enrolments, client identities (enrolled in the
    server's database in one transaction) and the package; not timed."""
    server = HomePaths(root / "server")
    init_server(server.home, name="server", listen=(LOCALHOST, 0))
    relays = [f"relay{r:02d}" for r in range(n_relays)]
    for name in relays:
        enroll(server.home, name, Role.RELAY, root / f"{name}.bundle")
    names = [f"c{i:05d}" for i in range(n_clients)]
    probe_names = ["probe-server"] + [f"probe-{r:02d}" for r in range(n_relays)]
    progress(f"issuing {n_clients + len(probe_names):,} client certificates")
    t0 = time.perf_counter()
    idents = issue_identities(server, names + probe_names, root / "ids")
    progress(f"  {time.perf_counter() - t0:.1f} s")
    with contextlib.closing(sqlite3.connect(server.db)) as db, db:
        db.executemany(
            "INSERT INTO nodes(name, role, enrolled, serial, pubkey) VALUES(?,?,?,?,?)",
            enrolment_rows(idents, Role.CLIENT),
        )
    src = root / "pkgsrc"
    src.mkdir()
    (src / "payload.bin").write_bytes(os.urandom(pkg_kib * 1024))
    with Admin(server.home) as admin:
        pkg = admin.add_package(src, "fleet", "1", install="true")
        admin.add_group("all", names)
        size = admin.store.data_path(pkg).stat().st_size
    return Setup(server, relays, idents[:n_clients], idents[n_clients:], pkg, size)


def cli_time(*args: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(
        [*rdsd_cmd(), *args], capture_output=True, text=True, timeout=300, cwd=ROOT, check=False
    )
    took = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"rdsd {' '.join(args)}: {out.stderr.strip()}")
    return took, out.stdout


def served_bytes(log: Path) -> Counter[str]:
    """Package bytes a daemon served, per peer, from its JSON log."""
    per: Counter[str] = Counter()
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            ev = json.loads(line)
            if ev.get("event") == "serve.done":
                per[str(ev.get("peer"))] += int(ev.get("bytes", 0))
    return per


async def count(db_path: Path, sql: str, *args: object) -> int:
    def q() -> int:
        with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
            return int(db.execute(sql, args).fetchone()[0])

    return await asyncio.to_thread(q)


async def until(
    what: str, check: Callable[[], object], timeout: float, every: float = 0.5
) -> float:
    t0 = time.perf_counter()
    async with asyncio.timeout(timeout):
        while True:
            value = check()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return time.perf_counter() - t0
            await asyncio.sleep(every)
    raise AssertionError(what)  # pragma: no cover - timeout raises first


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def add(self, figure: str, value: str, target: str = "") -> None:
        self.rows.append((figure, value, target))
        progress(f"{figure}: {value}")

    def render(self) -> str:
        w0 = max(len(r[0]) for r in self.rows)
        w1 = max(len(r[1]) for r in self.rows)
        return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in self.rows)


def own_lag(log: Path, since: float, until: float) -> tuple[list[dict[str, Any]], int]:
    """The ``loop.lag`` events a daemon logged (JSON) for periods that
    overlap ``since``..``until`` (wall clock), and how many it logged in all."""
    periods: list[dict[str, Any]] = []
    seen = 0
    for line in log.read_text(errors="replace").splitlines():
        if '"loop.lag"' not in line:
            continue
        with contextlib.suppress(ValueError, KeyError):
            ev = json.loads(line)
            if ev.get("event") != "loop.lag":
                continue
            seen += 1
            end = datetime.fromisoformat(ev["timestamp"]).timestamp()
            if end >= since and end - float(ev["period_s"]) <= until:
                periods.append(ev)
    return periods, seen


def own_lag_row(periods: list[dict[str, Any]]) -> str:
    """p50 = the median of the periods' medians; p99 and max = the worst
    period's (the target says "throughout")."""
    if not periods:
        return "no loop.lag event in the window (idle and never late)"
    p50 = statistics.median(float(p["p50_ms"]) for p in periods)
    p99 = max(float(p["p99_ms"]) for p in periods)
    worst = max(float(p["max_ms"]) for p in periods)
    return f"{p50:.1f} / {p99:.1f} / {worst:.1f} ms ({len(periods)} periods)"


def set_lag_period(home: Path, seconds: float) -> None:
    """Shorter loop.lag periods than the default, so a job phase of tens of
    seconds is covered by several."""
    cfg = NodeConfig.load(home)
    dataclasses.replace(cfg, loop_lag_period=seconds).save()


async def run(args: argparse.Namespace, root: Path, table: Table) -> None:
    s = prepare(root, args.clients, args.relays, args.package_kib)
    set_lag_period(s.server.home, args.lag_period)
    logs = root / "logs"
    daemons = Daemons(logs)
    workers = Workers(root, logs)
    json_run = ["--log-format", "json"]
    tasks: list[asyncio.Task[None]] = []
    try:
        proc = await daemons.start("server", s.server.home, *json_run)
        server_addr = await read_listening(proc)
        relay_addrs = []
        for name in s.relays:
            home = root / name
            init_node(home, Role.RELAY, root / f"{name}.bundle", server_addr, (LOCALHOST, 0))
            set_lag_period(home, args.lag_period)
            relay_proc = await daemons.start(name, home, *json_run)
            relay_addrs.append(await read_listening(relay_proc))
        pids = {name: p.pid for name, p in daemons.procs.items()}
        ca = s.server.ca_cert
        probes = [Probe("server", s.probes[0], server_addr, ca)] + [
            Probe(name, ident, addr, ca)
            for name, ident, addr in zip(s.relays, s.probes[1:], relay_addrs, strict=True)
        ]
        tasks += [asyncio.create_task(p.run()) for p in probes]
        rss0 = {n: rss_mib(pid)[0] for n, pid in pids.items()}

        # -- connect the fleet: each relay's share, all at once, jittered like daemons --
        n_workers = max(1, min(args.workers, len(s.clients)))
        progress(
            f"connecting {len(s.clients):,} clients to {len(s.relays)} relays "
            f"from {n_workers} worker processes"
        )
        t0 = time.perf_counter()
        await workers.start(
            [(ident, relay_addrs[i % len(relay_addrs)]) for i, ident in enumerate(s.clients)],
            n_workers,
            {
                "ca": str(ca),
                "signing_pub": str(s.server.signing_pub),
                "spread": args.spread,
                "connect_limit": args.connect_limit,
            },
        )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(args.connect_limit + 30):
                await workers.all_connected.wait()
        t_conn = time.perf_counter() - t0
        hs = workers.handshakes
        table.add(
            f"clients connected ({args.spread:.0f} s spread, {n_workers} worker processes)",
            f"{workers.connected:,}/{len(s.clients):,} in {t_conn:.1f} s",
        )
        table.add(
            "  handshake p50 / p99 / max",
            f"{pct(hs, 0.5):.3f} / {pct(hs, 0.99):.3f} / {max(hs, default=float('nan')):.3f} s",
        )
        retries, gave_up = workers.retries, workers.gave_up
        table.add(
            "  attempts retried / given up",
            f"{sum(retries.values()):,} / {sum(gave_up.values()):,}",
            "0 given up",
        )
        for reason, times in (retries + gave_up).most_common(3):
            table.add(f"    {reason[:70]}", f"{times:,}")
        relay_names = s.relays
        routed_sql = (
            f"SELECT COUNT(*) FROM nodes WHERE via IN ({','.join('?' * len(relay_names))}) "
            "AND name LIKE 'c%'"
        )
        connected = workers.connected
        t_routes = await until(
            "routes",
            lambda: count_at_least(s.server.db, routed_sql, tuple(relay_names), connected),
            120,
        )
        table.add(
            f"server routes all {connected:,} connected clients via their relays",
            f"{t_routes:.1f} s after",
        )
        await asyncio.sleep(5)
        rss_idle = {n: rss_mib(pid)[0] for n, pid in pids.items()}
        per_relay = len(s.clients) / len(s.relays)
        grow = [rss_idle[n] - rss0[n] for n in relay_names]
        table.add(
            "relay RSS idle, worst (before clients)",
            f"{max(rss_idle[n] for n in relay_names):.0f} MiB "
            f"({max(rss0[n] for n in relay_names):.0f} MiB)",
            f"< 200 MiB with {per_relay:,.0f} clients",
        )
        table.add(
            "  per idle session on a relay",
            f"{1024 * statistics.mean(grow) / per_relay:.1f} KiB",
            "<= 16 KiB",
        )
        table.add("server RSS idle", f"{rss_idle['server']:.0f} MiB", "< 300 MiB")
        sim_idle = [rss_mib(pid)[0] for pid in workers.pids()]
        table.add(
            f"simulator RSS per worker idle ({len(s.clients) / n_workers:,.0f} clients each)",
            f"{min(sim_idle):.0f}-{max(sim_idle):.0f} MiB",
        )

        # -- the job -------------------------------------------------------------------------
        # The simulated clients stand for machines of their own: for the job
        # they give the daemons the cores first (not in the connection storm,
        # whose keepalives they must keep sending to stay connected).
        for pid in workers.pids():
            os.setpriority(os.PRIO_PROCESS, pid, args.sim_nice)
        for p in probes:
            p.mark = len(p.rtts)
        cpu0 = {n: cpu_seconds(pid) for n, pid in pids.items()}
        wcpu0 = [cpu_seconds(pid) for pid in workers.pids()]
        wait0 = {n: cpu_wait_seconds(pid) for n, pid in pids.items()}
        wwait0 = [cpu_wait_seconds(pid) for pid in workers.pids()]
        wall0 = time.time()
        t_create, out = await asyncio.to_thread(
            cli_time,
            "job",
            "create",
            "--type",
            "install",
            "--package",
            s.package,
            "--to",
            "group:all",
            "--home",
            str(s.server.home),
        )
        job = out.strip()
        t0 = time.perf_counter()
        n = len(s.clients)
        table.add(f"rdsd job create --to group:all ({n:,})", f"{t_create:.2f} s", "< 1 s")
        installed_sql = "SELECT COUNT(*) FROM dests WHERE job=? AND state=?"
        try:
            await until(
                "installed",
                lambda: count_at_least(s.server.db, installed_sql, (job, DestState.INSTALLED), n),
                args.job_limit,
                0.25,
            )
            t_job = time.perf_counter() - t0
            table.add(
                f"job create -> all {n:,} installed (server's database)",
                f"{t_job:.1f} s",
                "< 60 s",
            )
        except TimeoutError:
            done = await count(s.server.db, installed_sql, job, DestState.INSTALLED)
            table.add(
                f"job create -> all {n:,} installed",
                f"not within {args.job_limit:.0f} s: {done:,} installed "
                f"({workers.installed:,} acked to clients)",
                "< 60 s",
            )
        wall1 = time.time()
        cpu1 = {n: cpu_seconds(pid) for n, pid in pids.items()}
        wcpu1 = [cpu_seconds(pid) for pid in workers.pids()]
        wait1 = {n: cpu_wait_seconds(pid) for n, pid in pids.items()}
        wwait1 = [cpu_wait_seconds(pid) for pid in workers.pids()]
        await asyncio.sleep(args.lag_period + 1)  # the period in progress gets logged
        for p in probes:
            lag = [1000 * v for v in p.since_mark()]
            table.add(
                f"  {p.name} loop lag p50 / p99 / max, seen from outside (PING->PONG)",
                f"{pct(lag, 0.5):.1f} / {pct(lag, 0.99):.1f} / {max(lag, default=0):.1f} ms",
                "p99 < 100 ms",
            )
            periods, _ = own_lag(logs / f"{p.name}.log", wall0, wall1)
            table.add(
                f"  {p.name} loop lag p50 / p99 / max, its own (loop.lag)",
                own_lag_row(periods),
                "p99 < 100 ms",
            )
        for name, pid in pids.items():
            rss, hwm = rss_mib(pid)
            table.add(
                f"  {name} RSS now (peak) / CPU / waiting for a CPU, during the job",
                cpu_row(rss, hwm, cpu1[name] - cpu0[name], wait1[name] - wait0[name]),
            )
        worst = [
            max((ms for t, k, ms in workers.lags if k == w and wall0 <= t <= wall1), default=0)
            for w in range(n_workers)
        ]
        table.add(
            "  simulator worker loop lag, worst per worker during the job",
            " / ".join(f"{ms:.0f}" for ms in worst) + " ms",
        )
        for w, pid in enumerate(workers.pids()):
            rss, hwm = rss_mib(pid)
            table.add(
                f"  simulator worker {w} RSS now (peak) / CPU / waiting, during the job",
                cpu_row(rss, hwm, wcpu1[w] - wcpu0[w], wwait1[w] - wwait0[w]),
            )
        sent = served_bytes(logs / "server.log")
        to_relays = [sent.get(n, 0) / s.size for n in relay_names]
        table.add(
            "server package bytes sent per relay / package",
            f"min {min(to_relays):.2f}, max {max(to_relays):.2f}",
            "1.00 (once per relay)",
        )
        t_status, _ = await asyncio.to_thread(
            cli_time, "job", "status", job, "--json", "--home", str(s.server.home)
        )
        table.add("rdsd job status JOB --json", f"{t_status:.2f} s", "< 0.5 s")
        t_nodes, _ = await asyncio.to_thread(
            cli_time, "nodes", "--json", "--home", str(s.server.home)
        )
        table.add(f"rdsd nodes --json ({n + len(s.relays) + len(probes):,} nodes)",
                  f"{t_nodes:.2f} s")  # fmt: skip
        lost = workers.lost
        table.add(
            "sessions lost during the run",
            f"{sum(lost.values()):,}",
            ", ".join(f"{k[:40]}: {v}" for k, v in lost.most_common(2)),
        )
    finally:
        for task in tasks:
            task.cancel()
        await workers.stop()
        await daemons.stop()


async def count_at_least(db: Path, sql: str, args: tuple[object, ...], want: int) -> bool:
    return await count(db, sql, *args) >= want


def run_loop(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` on uvloop when installed (as the daemons do)."""
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return worker_main(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=10_000)
    ap.add_argument("--relays", type=int, default=10)
    ap.add_argument("--workers", type=int, default=4, help="simulator processes")
    ap.add_argument("--package-kib", type=int, default=1024)
    ap.add_argument("--spread", type=float, default=10.0, help="seconds over which clients start")
    ap.add_argument("--connect-limit", type=float, default=300.0)
    ap.add_argument("--job-limit", type=float, default=300.0)
    ap.add_argument(
        "--lag-period", type=float, default=5.0, help="the daemons' [log] lag_period, seconds"
    )
    ap.add_argument(
        "--sim-nice",
        type=int,
        default=10,
        help="niceness of the simulator workers during the job (0: the daemons' own)",
    )
    ap.add_argument("--dir", help="work here and keep everything (logs included)")
    args = ap.parse_args()
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="rdsd-fleet-"))
    root.mkdir(parents=True, exist_ok=True)
    table = Table()
    started = time.perf_counter()
    try:
        run_loop(run(args, root, table))
    finally:
        if not args.dir:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    print(
        f"\nrdsd fleet: {args.clients:,} clients under {args.relays} relays, "
        f"package {args.package_kib} KiB, {args.workers} simulator processes, "
        f"{os.cpu_count()} cores, {time.perf_counter() - started:.0f} s in all"
    )
    print(table.render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
