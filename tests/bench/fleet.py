#!/usr/bin/env python3
"""Fleet simulator: one job to thousands of clients, through real daemons.

Run from the repository root::

    python tests/bench/fleet.py                      # 10,000 clients under 10 relays
    python tests/bench/fleet.py --clients 1000 --relays 4

One real server daemon and R real relay daemons (``rdsd run``, JSON logs)
run as subprocesses; N simulated clients live in this process. Each
simulated client is genuine on the wire: its own certificate signed by the
deployment's CA and enrolled on the server, mutual TLS 1.3, HELLO/WELCOME,
PINGs like a daemon's uplink, then for the job: JOB_NOTICE (the envelope is
verified), REPORT transferring, FETCH of the whole package from its relay,
REPORT installing and installed, each kept until acknowledged. What a
simulated client does not do is hash the chunks it receives or run an
install command: that work happens on a real client's own machine, not on
the relay or the server this bench measures.

Event-loop lag is measured from outside: one probe session to the server and
one to each relay sends a PING every 100 ms and times the PONG. On loopback
that round trip is the time the daemon's loop took to get to the message.

Everything listens on 127.0.0.1. Figures go to stdout as one table; progress
to stderr. tests/bench/README.md explains the figures and records runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from protocol import (  # noqa: E402
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
)
from rdsd.admin import Admin, enroll, init_node, init_server  # noqa: E402
from rdsd.claims import ClaimSigner  # noqa: E402
from rdsd.config import HomePaths  # noqa: E402
from rdsd.domain import DestState, Role  # noqa: E402
from rdsd.errors import SessionClosed  # noqa: E402
from rdsd.net.session import Session, open_child_session  # noqa: E402
from rdsd.packages.manifest import Envelopes  # noqa: E402
from rdsd.security import Verifier, client_context  # noqa: E402
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


# -- simulated clients ----------------------------------------------------------------------


@dataclass
class Fleet:
    """What the simulated clients share: the job's expectations and tallies."""

    envelopes: Envelopes
    deadline: float
    connected: int = 0
    installed: int = 0
    notices: int = 0
    gave_up: Counter[str] = field(default_factory=Counter)
    retries: Counter[str] = field(default_factory=Counter)
    lost: Counter[str] = field(default_factory=Counter)
    handshakes: list[float] = field(default_factory=list)
    all_connected: asyncio.Event = field(default_factory=asyncio.Event)
    target: int = 0

    def on_connected(self, seconds: float) -> None:
        self.connected += 1
        self.handshakes.append(seconds)
        if self.connected >= self.target:
            self.all_connected.set()


class SimClient:
    """One simulated client: reconnects with jittered backoff like a daemon's
    uplink; does each job addressed to it once."""

    def __init__(self, ident: Identity, parent: tuple[str, int], ca: Path, fleet: Fleet) -> None:
        self.ident = ident
        self.parent = parent
        self.ca = ca
        self.fleet = fleet
        self.seq = 0
        self.done_jobs: set[str] = set()
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
                    *self.parent, ctx, hello, HANDSHAKE, 3 * KEEPALIVE
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
                break
            self.fleet.retries["fetch refused, asked again"] += 1
            await asyncio.sleep(random.uniform(0.5, 1.5))
        await self.report(session, notice.job, DestState.INSTALLING, notice.package)
        await self.report(session, notice.job, DestState.INSTALLED, notice.package)


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


async def run(args: argparse.Namespace, root: Path, table: Table) -> None:
    s = prepare(root, args.clients, args.relays, args.package_kib)
    logs = root / "logs"
    daemons = Daemons(logs)
    json_run = ["--log-format", "json"]
    try:
        proc = await daemons.start("server", s.server.home, *json_run)
        server_addr = await read_listening(proc)
        relay_addrs = []
        for name in s.relays:
            home = root / name
            init_node(home, Role.RELAY, root / f"{name}.bundle", server_addr, (LOCALHOST, 0))
            relay_proc = await daemons.start(name, home, *json_run)
            relay_addrs.append(await read_listening(relay_proc))
        pids = {name: p.pid for name, p in daemons.procs.items()}
        verifier = Verifier(s.server.signing_pub.read_bytes())
        fleet = Fleet(Envelopes(verifier), deadline=time.monotonic() + args.connect_limit)
        fleet.target = len(s.clients)
        ca = s.server.ca_cert
        probes = [Probe("server", s.probes[0], server_addr, ca)] + [
            Probe(name, ident, addr, ca)
            for name, ident, addr in zip(s.relays, s.probes[1:], relay_addrs, strict=True)
        ]
        tasks = [asyncio.create_task(p.run()) for p in probes]
        rss0 = {n: rss_mib(pid)[0] for n, pid in pids.items()}

        # -- connect the fleet: each relay's share, all at once, jittered like daemons --
        progress(f"connecting {len(s.clients):,} clients to {len(s.relays)} relays")
        sims = [
            SimClient(ident, relay_addrs[i % len(relay_addrs)], ca, fleet)
            for i, ident in enumerate(s.clients)
        ]
        t0 = time.perf_counter()
        tasks += [asyncio.create_task(c.run(random.uniform(0, args.spread))) for c in sims]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(args.connect_limit + 30):
                await fleet.all_connected.wait()
        t_conn = time.perf_counter() - t0
        table.add(
            f"clients connected ({args.spread:.0f} s spread)",
            f"{fleet.connected:,}/{len(sims):,} in {t_conn:.1f} s",
        )
        table.add(
            "  handshake p50 / p99 / max",
            f"{pct(fleet.handshakes, 0.5):.3f} / {pct(fleet.handshakes, 0.99):.3f} / "
            f"{max(fleet.handshakes, default=float('nan')):.3f} s",
        )
        table.add(
            "  attempts retried / given up",
            f"{sum(fleet.retries.values()):,} / {sum(fleet.gave_up.values()):,}",
            "0 given up",
        )
        for reason, times in (fleet.retries + fleet.gave_up).most_common(3):
            table.add(f"    {reason[:70]}", f"{times:,}")
        relay_names = s.relays
        routed_sql = (
            f"SELECT COUNT(*) FROM nodes WHERE via IN ({','.join('?' * len(relay_names))}) "
            "AND name LIKE 'c%'"
        )
        t_routes = await until(
            "routes",
            lambda: count_at_least(s.server.db, routed_sql, tuple(relay_names), fleet.connected),
            120,
        )
        table.add(
            f"server routes all {fleet.connected:,} connected clients via their relays",
            f"{t_routes:.1f} s after",
        )
        await asyncio.sleep(5)
        rss_idle = {n: rss_mib(pid)[0] for n, pid in pids.items()}
        per_relay = len(sims) / len(s.relays)
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

        # -- the job -------------------------------------------------------------------------
        for p in probes:
            p.mark = len(p.rtts)
        cpu0 = {n: cpu_seconds(pid) for n, pid in pids.items()}
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
        table.add(f"rdsd job create --to group:all ({len(sims):,})", f"{t_create:.2f} s", "< 1 s")
        installed_sql = "SELECT COUNT(*) FROM dests WHERE job=? AND state=?"
        try:
            await until(
                "installed",
                lambda: count_at_least(
                    s.server.db, installed_sql, (job, DestState.INSTALLED), len(sims)
                ),
                args.job_limit,
                0.25,
            )
            t_job = time.perf_counter() - t0
            table.add(
                f"job create -> all {len(sims):,} installed (server's database)",
                f"{t_job:.1f} s",
                "< 60 s",
            )
        except TimeoutError:
            done = await count(s.server.db, installed_sql, job, DestState.INSTALLED)
            table.add(
                f"job create -> all {len(sims):,} installed",
                f"not within {args.job_limit:.0f} s: {done:,} installed "
                f"({fleet.installed:,} acked to clients)",
                "< 60 s",
            )
        cpu1 = {n: cpu_seconds(pid) for n, pid in pids.items()}
        for p in probes:
            lag = [1000 * v for v in p.since_mark()]
            table.add(
                f"  {p.name} loop lag p50 / p99 / max (PING->PONG)",
                f"{pct(lag, 0.5):.1f} / {pct(lag, 0.99):.1f} / {max(lag, default=0):.1f} ms",
                "p99 < 100 ms",
            )
        for n, pid in pids.items():
            rss, hwm = rss_mib(pid)
            table.add(
                f"  {n} RSS now (peak) / CPU during the job",
                f"{rss:.0f} ({hwm:.0f}) MiB / {cpu1[n] - cpu0[n]:.1f} s",
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
        table.add(f"rdsd nodes --json ({len(sims) + len(s.relays) + len(probes):,} nodes)",
                  f"{t_nodes:.2f} s")  # fmt: skip
        table.add(
            "sessions lost during the run",
            f"{sum(fleet.lost.values()):,}",
            ", ".join(f"{k[:40]}: {v}" for k, v in fleet.lost.most_common(2)),
        )
    finally:
        for task in tasks if "tasks" in locals() else []:
            task.cancel()
        await daemons.stop()


async def count_at_least(db: Path, sql: str, args: tuple[object, ...], want: int) -> bool:
    return await count(db, sql, *args) >= want


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=10_000)
    ap.add_argument("--relays", type=int, default=10)
    ap.add_argument("--package-kib", type=int, default=1024)
    ap.add_argument("--spread", type=float, default=10.0, help="seconds over which clients start")
    ap.add_argument("--connect-limit", type=float, default=300.0)
    ap.add_argument("--job-limit", type=float, default=300.0)
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
        import uvloop

        runner: Callable[..., object] = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(run(args, root, table))
    finally:
        if not args.dir:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    print(
        f"\nrdsd fleet: {args.clients:,} clients under {args.relays} relays, "
        f"package {args.package_kib} KiB, {os.cpu_count()} cores, "
        f"{time.perf_counter() - started:.0f} s in all"
    )
    print(table.render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
