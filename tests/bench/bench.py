#!/usr/bin/env python3
"""rdsd performance bench: the targets in docs/DESIGN.md against baselines of the same run.

Run from the repository root::

    python tests/bench/bench.py [--size-mib N] [--quick] [--profile]

Everything listens on 127.0.0.1 only. The in-process figures run every
node of a row in this one process and event loop, as the tests do; the
"separate processes" figures start ``rdsd run`` daemons through the CLI.
One table of figures and ratios is printed at the end; tests/bench/README.md
explains each of them. Timing never makes the script fail: the exit status
is 1 only when a section crashed or hung past its (generous) timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import getpass
import hashlib
import io
import logging
import os
import pstats
import random
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, MutableMapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import structlog  # noqa: E402

from protocol import Hello, Ping, Pong  # noqa: E402
from rdsd.admin import Admin, init_server  # noqa: E402
from rdsd.claims import ClaimSigner, public_key_der  # noqa: E402
from rdsd.config import HomePaths, NodeConfig  # noqa: E402
from rdsd.domain import Role  # noqa: E402
from rdsd.errors import SessionClosed  # noqa: E402
from rdsd.net.session import Peer, Session, open_child_session  # noqa: E402
from rdsd.node import Node  # noqa: E402
from rdsd.security import client_context, issue_certificate, server_context  # noqa: E402
from rdsd.state import JobDB  # noqa: E402
from tests.helpers import Deployment, rdsd_cmd, rdsft_cmd  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB
MB = 1_000_000
BLOCK = MiB
LOCALHOST = "127.0.0.1"
NOWHERE = (LOCALHOST, 9)  # parent of homes that are never run (their certificates are used)

# Generous, but short enough that a hung section ends the run in minutes.
TIMEOUTS: dict[str, Any] = {
    "handshake_timeout": 30.0,
    "idle_timeout": 60.0,
    "ping_interval": 15.0,
    "poll_interval": 0.05,
    "reconnect_min": 0.05,
    "reconnect_max": 0.5,
    "install_timeout": 300.0,
}
# The resumed client: a stalled fetch should show up as a delay, not hang the run.
RESUME_IDLE = 10.0
SAMPLE = 0.01  # how often the bench looks at job states and sessions

# The idle-clients part: sessions this process opens to one relay daemon.
IDLE_TARGET_MIB = 200  # docs/DESIGN.md: 10,000 idle clients on one relay under 200 MiB
IDLE_TARGET_N = 10_000
IDLE_CONCURRENCY = 200  # handshakes in flight at once
IDLE_HANDSHAKE = 30.0  # connect + TLS + HELLO/WELCOME, per session
IDLE_PING = 20.0  # the relay drops a child silent for idle_timeout (60 s by default)
IDLE_PONG_WAIT = 60.0
IDLE_PKG_MIB = 8  # the install jobs that show the relay still serves
IDLE_FD_SPARE = 256  # descriptors kept for everything but the idle sessions
IDLE_SETTLE = 10.0  # seconds of idleness over which the relay's CPU is sampled
IDLE_STALL = 120.0  # the install through the loaded relay: its uplink may be reconnecting

# The shaped-link part: each hop a link of its own at --link-mbit.
WAN_QUANTUM = 70_000  # HTB quantum in bytes: at least one 64 KiB loopback packet
WAN_BURST = "256k"  # what a class may send at once above its rate
WAN_OTHER = "10gbit"  # the default class (acknowledgements, everything else)
WAN_READY = 5.0  # seconds for the namespace's holder to have unshared
WAN_HOLD = 3600  # the holder's life at most, should the bench die without stopping it


def progress(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- the table ------------------------------------------------------------------------------------


@dataclass
class Row:
    figure: str
    value: str
    ratio: str = ""
    target: str = ""
    verdict: str = ""


@dataclass
class Table:
    sections: list[tuple[str, list[Row]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def section(self, title: str) -> list[Row]:
        rows: list[Row] = []
        self.sections.append((title, rows))
        return rows

    def render(self) -> str:
        """Aligned columns; a row with only a figure is a note, printed as is."""
        head = Row("figure", "value", "ratio", "target", "")
        rows = [head] + [r for _, rs in self.sections for r in rs if not is_note(r)]
        w = [max(len(getattr(r, k)) for r in rows) for k in ("figure", "value", "ratio", "target")]

        def line(r: Row) -> str:
            if is_note(r):
                return r.figure
            return (
                f"{r.figure:<{w[0]}}  {r.value:<{w[1]}}  {r.ratio:>{w[2]}}  "
                f"{r.target:<{w[3]}}  {r.verdict}"
            ).rstrip()

        out = [line(head), "=" * (sum(w) + 16)]
        for title, rs in self.sections:
            out.append(f"-- {title}")
            out.extend(line(r) for r in rs)
        return "\n".join(out)


def is_note(r: Row) -> bool:
    return not (r.value or r.ratio or r.target or r.verdict)


def mbps(nbytes: int, seconds: float) -> str:
    rate = nbytes / seconds / MB if seconds > 0 else float("inf")
    return f"{rate:,.0f} MB/s" if rate >= 100 else f"{rate:.1f} MB/s"


def rate(nbytes: int, seconds: float) -> float:
    return nbytes / seconds if seconds > 0 else float("inf")


def secs(t: float) -> str:
    return f"{t:.3f} s" if t < 10 else f"{t:.1f} s"


def judged(ratio: float, target: float, higher_is_better: bool) -> tuple[str, str, str]:
    ok = ratio >= target if higher_is_better else ratio <= target
    return (
        f"{ratio:.2f}",
        f"{'>=' if higher_is_better else '<='} {target:g}",
        ("meets" if ok else "misses"),
    )


# -- payloads and the deployment ----------------------------------------------------------------


def write_random(path: Path, size: int) -> None:
    """``size`` bytes of os.urandom, streamed to disk a block at a time."""
    with path.open("wb") as f:
        left = size
        while left > 0:
            n = min(left, BLOCK)
            f.write(os.urandom(n))
            left -= n


def add_package(admin: Admin, work: Path, name: str, version: str, size: int) -> str:
    src = work / f"src-{name}-{version}"
    src.mkdir()
    write_random(src / "payload.bin", size)
    try:
        return admin.add_package(src, name, version, install="true")
    finally:
        shutil.rmtree(src)


class Bench:
    """One deployment under ``root``: the server home plus the homes added to it."""

    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        self.root = root
        self.args = args
        init_server(root / "server", name="server", listen=(LOCALHOST, 0))
        self.server_cfg = NodeConfig.load(root / "server", **TIMEOUTS)
        self.dep = Deployment(root=root, server=self.server_cfg)
        self.admin = Admin(root / "server")
        self.size = args.size_mib * MiB
        self.pkg = ""
        self.pkg_size = 0
        self.pkg_file = Path()
        self.table = Table()
        self.one_hop_s: float | None = None
        self.tls_write_bps: float | None = None
        self.tls_discard_bps: float | None = None
        self.cp_bps: float | None = None
        self.copy_tools: dict[str, float | None] = {}
        # nginx figures: fan_bps (aggregate to K curls), nginx_cpu and
        # curl_cpu (CPU-seconds per GiB), when nginx and curl were measured.
        self.nginx: dict[str, float] = {}
        self.events: list[dict[str, Any]] = []

    def node_cfg(self, name: str, role: Role, parent: tuple[str, int], **extra: Any) -> NodeConfig:
        cfg = self.dep.add_node(name, role, parent)
        return replace(cfg, **{**TIMEOUTS, **extra})

    @property
    def chunk(self) -> int:
        return self.server_cfg.chunk_size


# -- watching a job -------------------------------------------------------------------------------


class Timeline:
    """First time (perf_counter) each node's state was seen, in one or more job databases."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str, str], float] = {}

    def at(self, where: str, node: str, state: str) -> float | None:
        return self.seen.get((where, node, state))


class Stalled(Exception):
    """No watched state changed for ``--stall`` seconds: rdsd is stuck, not slow."""


# (label, job database, the destinations whose rows to read there)
Watch = tuple[str, JobDB, list[str]]


async def follow(
    job: str, nodes: list[str], watch: list[Watch], timeout: float, stall: float
) -> Timeline:
    """Sample the job's rows until every node is final in the first database
    watched (the server's). Raises Stalled when nothing changes for ``stall``
    seconds (a transfer reports progress every few seconds, so that is a hang)."""
    tl = Timeline()
    last: list[tuple[str, str, str, str]] = []
    changed = time.perf_counter()
    top = watch[0][0]
    async with asyncio.timeout(timeout):
        while True:
            now = time.perf_counter()
            snap = []
            for label, db, names in watch:
                for name in names:
                    dest = db.dest(job, name)
                    if dest is not None:
                        tl.seen.setdefault((label, name, dest.state), now)
                        snap.append((label, name, str(dest.state), dest.detail))
            if snap != last:
                last, changed = snap, now
            if all(any(tl.at(top, n, s) for s in FINAL) for n in nodes):
                return tl
            if now - changed > stall:
                raise Stalled(stuck(job, watch, stall))
            await asyncio.sleep(SAMPLE)


# A destination's states that end its part of a job, as the bench sees them:
# an install ends installed, a transfer to a relay stored.
DONE = ("installed", "stored", "offered")
FINAL = (*DONE, "failed")


def stuck(job: str, watch: list[Watch], stall: float) -> str:
    """Where each watched node's row stands, and the reports still queued there."""
    parts = []
    for label, db, names in watch:
        queued = [r for r in db.outbox() if r.job == job]
        for name in names:
            dest = db.dest(job, name)
            state = dest.state if dest else "no row"
            parts.append(f"{label} has {name} {state}")
        if queued:
            parts.append(f"{label} outbox holds {', '.join(r.state for r in queued)}")
    return f"no state change for {stall:.0f} s: " + "; ".join(parts)


class Traffic:
    """A node's traffic observer: framed bytes sent, per peer, every session."""

    def __init__(self) -> None:
        self.frames: Counter[str] = Counter()

    def frames_sent(self, peer: str, nbytes: int) -> None:
        self.frames[peer] += nbytes

    def package_served(self, peer: str, nbytes: int) -> None:
        pass


class SentCounter:
    """Framed bytes a parent sent to some children, over all their sessions,
    from the traffic observer ``running`` gives every node; the bytes counted
    before ``start()`` are left out."""

    def __init__(self, parent: Node, names: set[str]) -> None:
        assert isinstance(parent.observer, Traffic)
        self.frames = parent.observer.frames
        self.names = sorted(names)
        self.before: dict[str, int] = {}

    def start(self) -> None:
        self.before = {n: self.frames[n] for n in self.names}

    async def stop(self) -> int:
        return self.total()

    def total(self) -> int:
        return sum(self.frames[n] - self.before.get(n, 0) for n in self.names)


async def wait_routed(db_node: Node, routes: dict[str, str], timeout: float = 60.0) -> None:
    """Until the server's database routes each node over the given child."""
    async with asyncio.timeout(timeout):
        while True:
            rows = {n: db_node.db.node(n) for n in routes}
            if all(r is not None and r.via == routes[n] for n, r in rows.items()):
                return
            await asyncio.sleep(SAMPLE)


@contextlib.asynccontextmanager
async def running(*cfgs: NodeConfig) -> AsyncIterator[list[Node]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(Node(cfg, observer=Traffic())) for cfg in cfgs]


def job_timeout(nbytes: int, copies: int = 1) -> float:
    # At least 120 s, and allow a crawl of 1 MB/s.
    return 120.0 + copies * nbytes / MB


# -- structured logs: to a file, and the few events the bench reads -----------------------------


def configure_logs(path: Path, events: list[dict[str, Any]]) -> io.TextIOWrapper:
    out = path.open("w")
    keep = {"fetch.start", "fetch.failed", "fetch.done", "serve.done", "uplink.lost"}

    def capture(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if event.get("event") in keep:
            events.append({**event, "t": time.perf_counter()})
        return event

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            capture,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    return out


# -- baselines -------------------------------------------------------------------------------------


def median_of(n: int, fn: Callable[[], float]) -> float:
    return statistics.median(fn() for _ in range(n))


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def time_cp(src: Path, dst: Path) -> float:
    os.sync()
    t0 = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    fsync_path(dst)
    t = time.perf_counter() - t0
    dst.unlink()
    return t


def time_sha256(src: Path) -> float:
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    t0 = time.perf_counter()
    h = hashlib.sha256()
    with src.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return time.perf_counter() - t0


class Sink(asyncio.BufferedProtocol):
    """The receiving end of the raw TLS copy: reads into one reused buffer,
    then discards it or writes it to a file."""

    def __init__(self, expected: int, fd: int, done: asyncio.Future[None]) -> None:
        self.buf = memoryview(bytearray(BLOCK))
        self.expected = expected
        self.fd = fd
        self.got = 0
        self.done = done

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        if self.fd >= 0:
            view = self.buf[:nbytes]
            while view:
                view = view[os.write(self.fd, view) :]
        self.got += nbytes
        if self.got >= self.expected and not self.done.done():
            self.done.set_result(None)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"lost after {self.got} bytes: {exc}"))


async def time_tls_copy(
    src: Path, size: int, server: HomePaths, client: HomePaths, dst: Path | None
) -> float:
    """Mutual TLS 1.3 with the deployment's certificates: the client end streams
    the file in 1 MiB writes; the server end reads it with a BufferedProtocol."""
    loop = asyncio.get_running_loop()
    sctx = server_context(server.ca_cert, server.cert, server.key)
    cctx = client_context(client.ca_cert, client.cert, client.key)
    done: asyncio.Future[None] = loop.create_future()
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if dst else -1
    srv = await loop.create_server(lambda: Sink(size, fd, done), LOCALHOST, 0, ssl=sctx)
    port = srv.sockets[0].getsockname()[1]
    os.sync()
    try:
        async with asyncio.timeout(job_timeout(size)):
            t0 = time.perf_counter()
            _, writer = await asyncio.open_connection(LOCALHOST, port, ssl=cctx)
            with src.open("rb", buffering=0) as f:
                while data := f.read(BLOCK):
                    writer.write(data)
                    await writer.drain()
            await done
            if fd >= 0:
                await loop.run_in_executor(None, os.fsync, fd)
            t = time.perf_counter() - t0
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    finally:
        srv.close()
        if fd >= 0:
            os.close(fd)
        if dst is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dst)
    return t


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex((LOCALHOST, port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout:.0f}s")


def wait_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {path.name} after {timeout:.0f}s")
        time.sleep(0.05)


@contextlib.contextmanager
def daemon(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")


def find_tools(*names: str) -> dict[str, str] | str:
    """The paths of ``names``, or the table cell that says which are missing."""
    found = {n: which(n) for n in names}
    missing = [n for n, p in found.items() if p is None]
    if missing:
        return f"n/a (not installed: {', '.join(missing)})"
    return {n: p for n, p in found.items() if p is not None}


def time_scp(src: Path, work: Path, repeat: int) -> float | str:
    """scp to a throw-away sshd on 127.0.0.1, then fsync the copy."""
    tools = find_tools("scp", "sshd", "ssh-keygen")
    if isinstance(tools, str):
        return tools
    if os.geteuid() == 0:
        # sshd started as root insists on its privilege-separation directory,
        # which only a packaged sshd's service unit creates.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    d = work / "sshd"
    d.mkdir()
    for key in ("host", "user"):
        subprocess.run(
            [tools["ssh-keygen"], "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True
        )
    shutil.copy(d / "user.pub", d / "authorized_keys")
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress {LOCALHOST}\nHostKey {d / 'host'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\n"
        "StrictModes no\nUsePAM no\nPasswordAuthentication no\nPubkeyAuthentication yes\n"
        # scp speaks SFTP since OpenSSH 9: without this it gets "Connection closed".
        "Subsystem sftp internal-sftp\n"
    )
    dst = work / "scp.copy"
    cmd = [
        tools["scp"],
        "-q",
        "-P",
        str(port),
        "-i",
        str(d / "user"),
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        str(src),
        f"{getpass.getuser()}@{LOCALHOST}:{dst}",
    ]
    with daemon(
        [str(tools["sshd"]), "-D", "-e", "-f", str(d / "sshd_config")], d / "sshd.log"
    ) as proc:
        wait_port(port, proc)

        def once() -> float:
            os.sync()
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, timeout=job_timeout(src.stat().st_size))
            fsync_path(dst)
            t = time.perf_counter() - t0
            dst.unlink()
            return t

        return median_of(repeat, once)


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's waited-for children."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def nginx_worker(master: int) -> int:
    """The pid of the single worker of an nginx master."""
    kids = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return int(kids[0])


def time_curl_nginx(
    src: Path,
    work: Path,
    server: HomePaths,
    client: HomePaths,
    repeat: int,
    extra: dict[str, float] | None = None,
    clients: int = 8,
    links: ShapedLinks | None = None,
) -> float | str:
    """curl from a throw-away nginx over HTTPS (TLS 1.3, client certificate
    required, the deployment's certificates), then fsync the copy. With
    ``extra``, also one more run for CPU cost (nginx worker CPU-seconds per
    GiB, ``nginx_cpu``; curl plus ``sha256sum`` of the copy, ``curl_cpu``)
    and ``clients`` concurrent curls for the aggregate rate (``fan_bps``).
    With ``links``, nginx and curl run in their namespace, over a link of
    its rate."""
    tools = find_tools("curl", "nginx")
    if isinstance(tools, str):
        return tools
    d = work / "nginx"
    (d / "www").mkdir(parents=True)
    (d / "logs").mkdir()
    os.link(src, d / "www" / "pkg")
    port = free_port()
    user = "user root;\n" if os.geteuid() == 0 else ""
    (d / "nginx.conf").write_text(
        f"{user}daemon off;\nworker_processes 1;\npid {d / 'nginx.pid'};\n"
        f"error_log {d / 'logs' / 'error.log'};\nevents {{}}\n"
        "http {\n  access_log off;\n  sendfile on;\n"
        f"  server {{\n    listen {LOCALHOST}:{port} ssl;\n    ssl_protocols TLSv1.3;\n"
        f"    ssl_certificate {server.cert};\n    ssl_certificate_key {server.key};\n"
        f"    ssl_client_certificate {server.ca_cert};\n    ssl_verify_client on;\n"
        f"    root {d / 'www'};\n  }}\n}}\n"
    )
    dst = work / "curl.copy"
    cmd = [
        tools["curl"],
        "-sSf",
        "--tlsv1.3",
        "-k",
        "--cert",
        str(client.cert),
        "--key",
        str(client.key),
        "-o",
        str(dst),
        f"https://{LOCALHOST}:{port}/pkg",
    ]
    prefix = links.prefix if links is not None else ()
    cmd = [*prefix, *cmd]
    with daemon(
        [*prefix, str(tools["nginx"]), "-p", str(d), "-c", str(d / "nginx.conf")],
        d / "nginx.out",
    ) as proc:
        if links is None:
            wait_port(port, proc)
        else:  # not reachable from here: nginx writes its pid file once it listens
            wait_file(d / "nginx.pid", proc)
            links.shape(port)

        def once() -> float:
            os.sync()
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, timeout=job_timeout(src.stat().st_size))
            fsync_path(dst)
            t = time.perf_counter() - t0
            dst.unlink()
            return t

        got = median_of(repeat, once)
        if extra is not None:
            size = src.stat().st_size
            worker = nginx_worker(proc.pid)
            w0, c0 = cpu_seconds(worker), children_cpu()
            subprocess.run(cmd, check=True, timeout=job_timeout(size))
            w1 = cpu_seconds(worker)
            subprocess.run(["sha256sum", str(dst)], check=True, stdout=subprocess.DEVNULL)
            c1 = children_cpu()
            dst.unlink()
            extra["nginx_cpu"] = (w1 - w0) / (size / GiB)
            extra["curl_cpu"] = (c1 - c0) / (size / GiB)
            os.sync()
            outs = [work / f"curl.fan{i}" for i in range(clients)]
            t0 = time.perf_counter()
            many = [subprocess.Popen([*cmd[:-3], "-o", str(o), cmd[-1]]) for o in outs]
            for p in many:
                p.wait(timeout=job_timeout(size, clients))
            extra["fan_bps"] = rate(size * clients, time.perf_counter() - t0)
            for o in outs:
                o.unlink(missing_ok=True)
        return got


async def baselines(b: Bench) -> None:
    rows = b.table.section(
        f"baselines: the package file ({b.pkg_size / MiB:.0f} MiB, page cache), "
        f"median of {b.args.repeat}"
    )
    src, size, work = b.pkg_file, b.pkg_size, b.root / "baseline"
    work.mkdir()
    progress("baselines: cp, SHA-256, raw TLS copies, scp, curl")
    t = median_of(b.args.repeat, lambda: time_cp(src, work / "cp.copy"))
    b.cp_bps = rate(size, t)
    rows.append(Row("cp to a new file + fsync", f"{mbps(size, t)}  ({secs(t)})"))
    t = median_of(b.args.repeat, lambda: time_sha256(src))
    rows.append(Row("SHA-256, 1 MiB blocks, one core", f"{mbps(size, t)}  ({secs(t)})"))
    tls_client = b.dep.add_node("tlsbench", Role.CLIENT, NOWHERE).paths
    server = b.server_cfg.paths
    for label, dst in (("discard", None), ("write to file + fsync", work / "tls.copy")):
        times = [
            await time_tls_copy(src, size, server, tls_client, dst) for _ in range(b.args.repeat)
        ]
        t = statistics.median(times)
        if dst is None:
            b.tls_discard_bps = rate(size, t)
        else:
            b.tls_write_bps = rate(size, t)
        rows.append(Row(f"asyncio mutual TLS 1.3 copy, {label}", f"{mbps(size, t)}  ({secs(t)})"))
    copies: tuple[tuple[str, str, Callable[[], float | str]], ...] = (
        ("scp over loopback (sshd) + fsync", "scp", lambda: time_scp(src, work, b.args.repeat)),
        (
            "curl from nginx, HTTPS mutual TLS + fsync",
            "curl",
            lambda: time_curl_nginx(
                src, work, server, tls_client, b.args.repeat, b.nginx, b.args.clients
            ),
        ),
    )
    for label, key, fn in copies:
        try:
            got = fn()
        except Exception as exc:
            got = f"error: {exc}"
        if isinstance(got, float):
            b.copy_tools[key] = rate(size, got)
            rows.append(Row(label, f"{mbps(size, got)}  ({secs(got)})"))
        else:
            b.copy_tools[key] = None
            rows.append(Row(label, got))
    if "fan_bps" in b.nginx:
        k = b.args.clients
        rows.append(
            Row(f"nginx to {k} concurrent curls, aggregate", f"{b.nginx['fan_bps'] / MB:,.0f} MB/s")
        )
        rows.append(Row("nginx worker CPU per GiB sent", f"{b.nginx['nginx_cpu']:.2f} s/GiB"))
        rows.append(
            Row("curl + sha256sum CPU per GiB received", f"{b.nginx['curl_cpu']:.2f} s/GiB")
        )


# -- rdsd, in process ---------------------------------------------------------------------------


def note(text: str) -> Row:
    return Row(text, "")


def breakdown(tl: Timeline, client: str, t0: float, size: int) -> Row:
    """Where the time of one destination went, from its own database and the server's."""
    got = [tl.at(client, client, s) for s in ("transferring", "installing", "installed")]
    seen = tl.at("server", client, "installed")
    if any(v is None for v in got) or seen is None:
        return note("  breakdown n/a (a state was not sampled)")
    a, b, c = got
    assert a is not None and b is not None and c is not None
    return note(
        f"  notice {a - t0:.2f} s, transfer {b - a:.2f} s ({mbps(size, b - a)}), "
        f"verify+extract+install {c - b:.2f} s, report {seen - c:.2f} s"
    )


async def one_job(
    b: Bench,
    watch: list[Watch],
    dests: list[str],
    pkg: str,
    size: int,
    stall: float | None = None,
    kind: str = "install",
) -> tuple[float, Timeline, float]:
    """Create a job (an install unless ``kind`` says otherwise) as an operator
    would (the server's database, from another connection) and follow it;
    returns (seconds until the server sees every destination installed, or
    stored for a transfer, offered for an offer; the timeline, t0). ``stall``
    overrides ``--stall``."""
    os.sync()
    t0 = time.perf_counter()
    job = b.admin.create_job(kind, pkg, dests)
    tl = await follow(job, dests, watch, job_timeout(size, len(dests)), stall or b.args.stall)
    top, db, _ = watch[0]
    bad = [n for n in dests if tl.at(top, n, "failed") is not None]
    if bad:
        detail = {d.node: d.detail for d in db.dests(job) if d.node in bad}
        raise RuntimeError(f"job {job} failed: {detail}")
    end = max(t for (w, _, st), t in tl.seen.items() if w == top and st in DONE)
    return end - t0, tl, t0


def one_hop_rows(b: Bench, rows: list[Row], t: float, tl: Timeline, t0: float, who: str) -> None:
    size = b.pkg_size
    ratio, target, verdict = "n/a", "", ""
    if b.tls_write_bps:
        ratio, target, verdict = judged(rate(size, t) / b.tls_write_bps, 0.8, True)
    rows.append(
        Row(
            "one hop server->client, job to installed",
            f"{mbps(size, t)}  ({secs(t)})",
            ratio,
            f"{target} x TLS copy+file",
            verdict,
        )
    )
    rows.append(breakdown(tl, who, t0, size))


async def one_hop(b: Bench, server: Node, rows: list[Row]) -> None:
    progress(f"one hop: server -> client, {b.pkg_size / MiB:.0f} MiB")
    cfg = b.node_cfg("client1", Role.CLIENT, server.address)
    async with running(cfg) as (client,):
        await wait_routed(server, {"client1": "client1"})
        counter = SentCounter(server, {"client1"})
        counter.start()
        prof = cProfile.Profile() if b.args.profile else None
        if prof is not None:
            prof.enable()
        watch = [("server", server.db, ["client1"]), ("client1", client.db, ["client1"])]
        t, tl, t0 = await one_job(b, watch, ["client1"], b.pkg, b.pkg_size)
        if prof is not None:
            prof.disable()
            dump_profile(prof, b.root.parent / "bench-one-hop.prof")
        sent = await counter.stop()
    b.one_hop_s = t
    size = b.pkg_size
    one_hop_rows(b, rows, t, tl, t0, "client1")
    if b.tls_discard_bps:
        rows.append(Row("  vs TLS copy, discard", "", f"{rate(size, t) / b.tls_discard_bps:.2f}"))
    if b.cp_bps:
        rows.append(Row("  vs cp + fsync", "", f"{rate(size, t) / b.cp_bps:.2f}"))
    for key, label in (("scp", "scp"), ("curl", "curl from nginx")):
        tool = b.copy_tools.get(key)
        if tool:
            r, tg, v = judged(rate(size, t) / tool, 1.0, True)
            rows.append(Row(f"  vs {label}", "", r, f"{tg} x {key}", v))
        else:
            rows.append(Row(f"  vs {label}", "n/a (baseline not measured)"))
    rows.append(Row("  server bytes sent / package", f"{sent / MiB:.1f} MiB", f"{sent / size:.4f}"))


def two_hop_rows(rows: list[Row], size: int, t: float, one: float | None) -> None:
    ratio, target, verdict = "n/a", "", ""
    if one:
        ratio, target, verdict = judged(t / one, 1.1, False)
    rows.append(
        Row(
            "two hops server->relay->client",
            f"{mbps(size, t)}  ({secs(t)})",
            ratio,
            f"{target} x one hop (time)",
            verdict,
        )
    )


async def two_hops(b: Bench, server: Node, rows: list[Row]) -> None:
    progress(f"two hops: server -> relay -> client, {b.pkg_size / MiB:.0f} MiB")
    relay_cfg = b.node_cfg("relay2", Role.RELAY, server.address)
    async with running(relay_cfg) as (relay,):
        cfg = b.node_cfg("client2", Role.CLIENT, relay.address)
        async with running(cfg) as (client,):
            await wait_routed(server, {"relay2": "relay2", "client2": "relay2"})
            watch = [
                ("server", server.db, ["client2"]),
                ("relay2", relay.db, ["client2"]),
                ("client2", client.db, ["client2"]),
            ]
            t, tl, t0 = await one_job(b, watch, ["client2"], b.pkg, b.pkg_size)
    two_hop_rows(rows, b.pkg_size, t, b.one_hop_s)
    rows.append(breakdown(tl, "client2", t0, b.pkg_size))


async def fan_out(b: Bench, server: Node, rows: list[Row]) -> None:
    k, size = b.args.clients, b.args.fan_mib * MiB
    progress(f"fan-out: one relay, {k} clients, {size / MiB:.0f} MiB")
    pkg = add_package(b.admin, b.root, "fan", f"{size // MiB}m", size)
    size = b.admin.store.data_path(pkg).stat().st_size
    names = [f"fan{i:03d}" for i in range(1, k + 1)]
    relay_cfg = b.node_cfg("relayF", Role.RELAY, server.address)
    async with running(relay_cfg) as (relay,):
        cfgs = [b.node_cfg(n, Role.CLIENT, relay.address) for n in names]
        async with running(*cfgs):
            await wait_routed(server, {"relayF": "relayF", **dict.fromkeys(names, "relayF")})
            up = SentCounter(server, {"relayF"})
            down = SentCounter(relay, set(names))
            up.start()
            down.start()
            watch = [("server", server.db, names), ("relayF", relay.db, names)]
            t_k, _, _ = await one_job(b, watch, names, pkg, size)
            server_sent, relay_sent = await up.stop(), await down.stop()
        # The relay now holds the package: one client from its cache, the unit of the estimate.
        cfg = b.node_cfg("fanX", Role.CLIENT, relay.address)
        async with running(cfg) as (client,):
            await wait_routed(server, {"fanX": "relayF"})
            watch = [("server", server.db, ["fanX"]), ("fanX", client.db, ["fanX"])]
            t_1, tl, t0 = await one_job(b, watch, ["fanX"], pkg, size)
    r, tg, v = judged(server_sent / size, 1.05, False)
    rows.append(
        Row(
            f"fan-out, {k} clients behind one relay, {size / MiB:.0f} MiB: "
            "server bytes sent / package",
            f"{server_sent / MiB:.2f} MiB",
            f"{server_sent / size:.3f}",
            f"{tg} (sent once)",
            v,
        )
    )
    rows.append(
        Row(
            "  relay bytes sent to its clients / package",
            f"{relay_sent / MiB:.1f} MiB",
            f"{relay_sent / size:.2f}",
            f"(= {k} clients)",
        )
    )
    r, tg, v = judged(t_k / (k * t_1), 1.5, False)
    rows.append(
        Row(
            f"fan-out time to all {k} installed / ({k} x one hop from the relay)",
            f"{secs(t_k)} vs {k} x {secs(t_1)}",
            r,
            tg,
            v,
        )
    )
    agg = rate(k * size, t_k)
    if "fan_bps" in b.nginx:
        r, tg, v = judged(agg / b.nginx["fan_bps"], 0.7, True)
        rows.append(
            Row(
                f"  aggregate to {k} clients vs nginx to {k} curls",
                f"{agg / MB:,.0f} MB/s",
                r,
                f"{tg} x nginx",
                v,
            )
        )
    rows.append(note(f"  one hop from the relay's cache: {mbps(size, t_1)}"))
    rows.append(breakdown(tl, "fanX", t0, size))
    rows.append(note(f"  the relay pushed {relay_sent / MB / t_k:,.0f} MB/s to its clients"))


class CutProxy:
    """TCP proxy on 127.0.0.1: its first connection is closed (both sides) once
    ``cut_after`` bytes went from the server to the client; later ones pass."""

    def __init__(self, target: tuple[str, int], cut_after: int) -> None:
        self.target = target
        self.cut_after = cut_after
        self.connections = 0
        self.delivered_first = 0
        self.cut_at: float | None = None
        self.on_cut: Callable[[], None] | None = None
        self._server: asyncio.Server | None = None

    async def start(self) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._handle, LOCALHOST, 0)
        return LOCALHOST, int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.connections += 1
        first = self.connections == 1
        try:
            sr, sw = await asyncio.open_connection(*self.target)
        except OSError:
            cw.close()
            return
        pumps = [
            asyncio.create_task(self._pump(cr, sw, None)),
            asyncio.create_task(self._pump(sr, cw, self.cut_after if first else None)),
        ]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pumps:
            task.cancel()
        for w in (cw, sw):
            w.close()
        await asyncio.gather(*pumps, return_exceptions=True)

    async def _pump(
        self, r: asyncio.StreamReader, w: asyncio.StreamWriter, limit: int | None
    ) -> None:
        moved = 0
        with contextlib.suppress(ConnectionError, OSError):
            while data := await r.read(256 * 1024):
                if limit is not None and moved + len(data) >= limit:
                    w.write(data[: limit - moved])
                    await w.drain()
                    self.delivered_first = limit
                    self.cut_at = time.perf_counter()
                    if self.on_cut is not None:
                        self.on_cut()
                    return
                w.write(data)
                await w.drain()
                moved += len(data)
                if limit is not None:
                    self.delivered_first = moved


async def resume(b: Bench, server: Node, rows: list[Row]) -> None:
    size = b.pkg_size
    progress(f"resume: server -> client cut at 90 % of {size / MiB:.0f} MiB")
    proxy = CutProxy(server.address, int(0.9 * size))
    addr = await proxy.start()
    cfg = b.node_cfg("clientR", Role.CLIENT, addr, idle_timeout=RESUME_IDLE)
    try:
        async with running(cfg) as (client,):
            await wait_routed(server, {"clientR": "clientR"})
            counter = SentCounter(server, {"clientR"})
            counter.start()
            sent_at_cut: list[int] = []
            proxy.on_cut = lambda: sent_at_cut.append(counter.total())
            watch = [("server", server.db, ["clientR"]), ("clientR", client.db, ["clientR"])]
            t, _, _ = await one_job(b, watch, ["clientR"], b.pkg, size)
            sent = await counter.stop()
    finally:
        await proxy.close()
    mine = [e for e in b.events if e.get("node") == "clientR"]
    starts = [e for e in mine if e.get("event") == "fetch.start"]
    fails = [e for e in mine if e.get("event") == "fetch.failed"]
    limit = 1 + b.chunk / size
    _, _, v = judged(sent / size, limit, False)
    rows.append(
        Row(
            "resume after a cut at 90 %: server bytes sent / package",
            f"{sent / MiB:.1f} MiB, {len(starts)} fetches",
            f"{sent / size:.3f}",
            f"<= {limit:.3f} (1 chunk over)",
            v,
        )
    )
    if proxy.cut_at is None or len(starts) < 2:
        offsets = [e.get("offset") for e in starts]
        rows.append(note(f"  no resume seen (cut: {proxy.cut_at is not None}, fetches {offsets})"))
        return
    resumed = int(starts[1].get("offset", 0))
    lost = proxy.delivered_first - resumed
    _, _, v = judged(lost / b.chunk, 1.0, False)
    rows.append(
        Row(
            "  of it delivered before the cut, then sent again",
            f"{lost / MiB:.2f} MiB",
            f"{lost / b.chunk:.2f}",
            "<= 1 chunk",
            v,
        )
    )
    rows.append(
        note(
            f"  cut after {proxy.delivered_first / MiB:.1f} MiB had reached the client; "
            f"the fetch resumed from {resumed / MiB:.1f} MiB"
        )
    )
    if sent_at_cut:
        rows.append(
            note(
                f"  at the cut the server had sent {sent_at_cut[0] / MiB:.1f} MiB; "
                f"{(sent_at_cut[0] - proxy.delivered_first) / MiB:.1f} MiB were in socket "
                "and proxy buffers then"
            )
        )
    again = float(starts[1]["t"]) - proxy.cut_at
    reasons = "; ".join(str(e.get("reason")) for e in fails)
    rows.append(note(f"  fetch restarted {again:.2f} s after the cut ({reasons})"))
    rows.append(note(f"  job to installed, cut included: {secs(t)} ({mbps(size, t)})"))


def dump_profile(prof: cProfile.Profile, path: Path) -> None:
    prof.dump_stats(path)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
    print(out.getvalue(), file=sys.stderr)
    progress(f"profile of the one-hop run written to {path}")


async def in_process(b: Bench) -> None:
    b.table.section(
        f"rdsd, every node in this one process and event loop ({loop_name()}); "
        f"package {b.pkg_size / MiB:.0f} MiB, chunk {b.chunk // MiB} MiB"
    )
    rows = b.table.sections[-1][1]
    async with running(b.server_cfg) as (server,):
        for name, fn in (
            ("one hop", one_hop),
            ("two hops", two_hops),
            ("fan-out", fan_out),
            ("resume", resume),
        ):
            await guarded(b, name, fn(b, server, rows))


def bench_frame(exc: BaseException) -> str:
    """The innermost line of this script in the exception's traceback."""
    here = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == __file__]
    return f"{here[-1].name}, line {here[-1].lineno}: {here[-1].line}" if here else "?"


async def guarded(b: Bench, name: str, coro: Awaitable[None]) -> None:
    """Run one part; a crash, a stall or a hang becomes an ERROR row (exit status 1)."""
    try:
        await coro
    except Exception as exc:
        if isinstance(exc, TimeoutError):
            kind, what = "timed out", f"a bounded wait ran out ({bench_frame(exc)})"
        elif isinstance(exc, Stalled):
            kind, what = "stalled", str(exc)
        else:
            kind, what = "crashed", f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        what = " ".join(what.split())[:400]
        b.table.sections[-1][1].append(Row(f"{name}: ERROR", kind))
        b.table.sections[-1][1].append(note(f"  {what}"))
        b.table.errors.append(f"{name} {kind}")


# -- rdsd daemons: peak RSS, hops between processes, rdsft -a -----------------------------------


def vm_status(pid: int | str, field: str) -> float:
    """A ``/proc/PID/status`` memory figure (VmRSS, VmHWM, ...) in MiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(m.group(1)) / 1024 if m else float("nan")


def vm_hwm(pid: int) -> float:
    return vm_status(pid, "VmHWM")


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU time of a process so far, from ``/proc/PID/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    return sum(cpu_split(pid))


class Daemons:
    """``rdsd run`` subprocesses, each with its stderr in ``logs/NAME.log``."""

    def __init__(self, logs: Path, prefix: tuple[str, ...] = ()) -> None:
        self.logs = logs
        logs.mkdir(exist_ok=True)
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.prefix = prefix  # e.g. nsenter into a network namespace

    async def start(self, name: str, home: Path, *extra: str) -> asyncio.subprocess.Process:
        """``rdsd run --home HOME`` plus ``extra`` arguments."""
        with (self.logs / f"{name}.log").open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                *self.prefix,
                *rdsd_cmd(),
                "run",
                "--home",
                str(home),
                *extra,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
            )
        self.procs[name] = proc
        return proc

    async def stop(self) -> None:
        """SIGTERM to all, then up to 10 s each before SIGKILL."""
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for proc in self.procs.values():
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def read_listening(
    proc: asyncio.subprocess.Process, timeout: float = 30.0
) -> tuple[str, int]:
    """The daemon prints where it listens on stdout once it does."""
    assert proc.stdout is not None
    async with asyncio.timeout(timeout):
        while line := (await proc.stdout.readline()).decode():
            m = re.search(r"listening on (.+):(\d+)", line)
            if m:
                return m.group(1), int(m.group(2))
    raise RuntimeError(f"daemon exited with {await proc.wait()} before listening")


async def wait_routed_db(db: JobDB, routes: dict[str, str], timeout: float = 60.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            rows = {n: db.node(n) for n in routes}
            if all(r is not None and r.via == routes[n] for n, r in rows.items()):
                return
            await asyncio.sleep(SAMPLE)


async def time_rdsft(home: Path) -> tuple[list[float], str]:
    times: list[float] = []
    said = ""
    for _ in range(5):
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *rdsft_cmd(),
            "-a",
            "--home",
            str(home),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        async with asyncio.timeout(120):
            raw, _ = await proc.communicate()
        times.append(time.perf_counter() - t0)
        said = raw.decode().strip()
        if proc.returncode != 0:
            raise RuntimeError(f"rdsft -a exited with {proc.returncode}: {said}")
    return times, said


@dataclass(frozen=True)
class FanOut:
    """One fan-out job between daemons: how long it took and the CPU the
    relay and its receivers used over it."""

    took: float
    relay_cpu: float
    receivers_cpu: float
    receivers_system: float  # of receivers_cpu, in the kernel

    @property
    def busy(self) -> float:
        """The share of the machine's cores the relay and receivers used."""
        return (self.relay_cpu + self.receivers_cpu) / (self.took * (os.cpu_count() or 1))


async def fan_job(
    b: Bench, procs: dict[str, asyncio.subprocess.Process], names: list[str], kind: str, size: int
) -> FanOut:
    """A ``kind`` job of the bench's package from relayP to the daemons ``names``."""
    pids = [procs[n].pid for n in ("relayP", *names)]
    cpu0 = [cpu_split(pid) for pid in pids]
    took, _, _ = await one_job(b, [("server", b.admin.db, names)], names, b.pkg, size, kind=kind)
    used = [
        (user - user0, system - system0)
        for (user, system), (user0, system0) in zip(map(cpu_split, pids), cpu0, strict=True)
    ]
    receivers = used[1:]
    return FanOut(
        took, sum(used[0]), sum(u + k for u, k in receivers), sum(k for _, k in receivers)
    )


def fan_row(b: Bench, label: str, nbytes: int, took: float) -> Row:
    """A fan-out's aggregate rate, judged against nginx to as many curls."""
    agg = rate(nbytes, took)
    r, tg, v = "n/a", "", ""
    if "fan_bps" in b.nginx:
        r, tg, v = judged(agg / b.nginx["fan_bps"], 0.7, True)
    k = b.args.clients
    return Row(
        f"fan-out: relay daemon to {label}", f"{agg / MB:,.0f} MB/s  ({secs(took)})",
        r, f"{tg} x nginx to {k} curls", v,
    )  # fmt: skip


async def daemons(b: Bench) -> None:
    rows = b.table.section(
        "rdsd daemons, one process per node (`rdsd run`, its default poll interval)"
    )
    progress("daemons: separate processes for peak RSS, one and two hops, rdsft -a")
    fleet = Daemons(b.root / "daemon-logs")
    procs = fleet.procs
    start = fleet.start
    dbs: list[JobDB] = []

    def db_of(home: Path) -> JobDB:
        dbs.append(JobDB(HomePaths(home).db))
        return dbs[-1]

    try:
        server_addr = await read_listening(await start("server", b.server_cfg.home))
        relay = b.dep.add_node("relayP", Role.RELAY, server_addr).home
        relay_addr = await read_listening(await start("relayP", relay))
        c1 = b.dep.add_node("clientP1", Role.CLIENT, server_addr).home
        c2 = b.dep.add_node("clientP2", Role.CLIENT, relay_addr).home
        await start("clientP1", c1)
        await start("clientP2", c2)
        server = b.admin.db
        routes = {"relayP": "relayP", "clientP1": "clientP1", "clientP2": "relayP"}
        await wait_routed_db(server, routes)
        idle = {n: vm_hwm(p.pid) for n, p in procs.items()}
        size = b.pkg_size
        watch = [("server", server, ["clientP1"]), ("clientP1", db_of(c1), ["clientP1"])]
        cpu0 = {n: cpu_seconds(procs[n].pid) for n in ("server", "clientP1")}
        t1, tl1, s1 = await one_job(b, watch, ["clientP1"], b.pkg, size)
        cpu = {n: (cpu_seconds(procs[n].pid) - c) / (size / GiB) for n, c in cpu0.items()}
        watch = [
            ("server", server, ["clientP2"]),
            ("relayP", db_of(relay), ["clientP2"]),
            ("clientP2", db_of(c2), ["clientP2"]),
        ]
        t2, tl2, s2 = await one_job(b, watch, ["clientP2"], b.pkg, size)
        peak = {n: vm_hwm(p.pid) for n, p in procs.items()}
        # Fan-out between processes: K daemons behind the relay, which holds
        # the package now, against nginx serving the file to K curls. First
        # client daemons that install it; then relay daemons that only
        # receive, check each chunk and store it (a transfer job): the
        # relay's side of the fan-out without the K extractions and installs
        # on the same two cores, the closest rdsd gets to curls that only
        # write a file; then client daemons that only take delivery (an
        # offer job: received, checked, written and fsynced).
        k = b.args.clients
        fanned: list[tuple[Role, str, list[str], FanOut]] = []
        for prefix, role, kind, what in (
            ("fanP", Role.CLIENT, "install", "job to installed"),
            ("fanR", Role.RELAY, "transfer", "transfer job to stored"),
            ("fanO", Role.CLIENT, "offer", "offer job to offered"),
        ):
            names = [f"{prefix}{i}" for i in range(1, k + 1)]
            for name in names:
                started = await start(name, b.dep.add_node(name, role, relay_addr).home)
                if role is Role.RELAY:
                    await read_listening(started)
            await wait_routed_db(server, dict.fromkeys(names, "relayP"))
            fanned.append((role, what, names, await fan_job(b, procs, names, kind, size)))
            peak.update({n: vm_hwm(procs[n].pid) for n in ("relayP", *names)})
        one_hop_rows(b, rows, t1, tl1, s1, "clientP1")
        two_hop_rows(rows, size, t2, t1)
        rows.append(breakdown(tl2, "clientP2", s2, size))
        for who, key, target, label in (
            ("server", "nginx_cpu", 1.5, "nginx worker"),
            ("clientP1", "curl_cpu", 2.0, "curl + sha256sum"),
        ):
            side = "sender" if who == "server" else "receiver"
            r, tg, v = "n/a", "", ""
            if key in b.nginx:
                r, tg, v = judged(cpu[who] / b.nginx[key], target, False)
            rows.append(
                Row(
                    f"{side} CPU per GiB, one hop ({who}, job to installed)",
                    f"{cpu[who]:.2f} s/GiB",
                    r,
                    f"{tg} x {label}",
                    v,
                )
            )
        sent = k * size / GiB
        for who, what, _, fan in fanned:
            rows.append(fan_row(b, f"{k} {who} daemons, aggregate ({what})", k * size, fan.took))
            rows.append(
                note(
                    f"  relay CPU {fan.relay_cpu / sent:.2f} s per GiB sent to its {who}s; "
                    f"the {who}s' {fan.receivers_cpu / sent:.2f} s per GiB received "
                    f"({fan.receivers_system / max(fan.receivers_cpu, 1e-9):.0%} in the kernel); "
                    f"all of them used {fan.busy:.0%} of the machine's cores"
                )
            )
        worst = max(peak.values())
        _, _, v = judged(worst, 64, False)
        rows.append(Row("peak RSS of any node (VmHWM)", f"{worst:.0f} MiB", "", "< 64 MiB", v))
        for name in procs:
            if name in idle:
                rows.append(
                    Row(f"  {name}", f"{idle[name]:.0f} MiB idle, {peak[name]:.0f} MiB peak")
                )
        for who, what, names, _ in fanned:
            worst_of = max(peak[n] for n in names)
            rows.append(Row(f"  {k} fan-out {who}s, {what}, worst", f"{worst_of:.0f} MiB peak"))
        times, said = await time_rdsft(c1)
        t = statistics.median(times)
        _, _, v = judged(t, 0.5, False)
        rows.append(Row("rdsft -a, nothing pending (median of 5)", secs(t), "", "< 0.5 s", v))
        last = said.splitlines()[-1] if said else ""
        rows.append(note(f"  runs {', '.join(f'{x:.2f}' for x in times)} s; it said {last!r}"))
        bare = statistics.median(bare_import_times())
        rows.append(Row("  python start + import rdsd.cli.rdsft alone", secs(bare)))
    finally:
        await fleet.stop()
        for db in dbs:
            db.close()


class ShapedLinks:
    """Links with a rate, on one machine: a network namespace of its own
    (held by a sleeping ``unshare -n`` process; daemons enter it with
    ``nsenter``) whose loopback sends what each listening port sends through
    an HTB class of its own, so a parent's port is the link below it. A
    two-hop transfer then crosses two links of the same rate, as it would
    between three machines, while the CPU stays the same two cores."""

    def __init__(self, mbit: int) -> None:
        self.mbit = mbit
        self.holder: subprocess.Popen[bytes] | None = None
        self.classes: dict[int, str] = {}  # source port -> class id

    def start(self) -> str | None:
        """Make the namespace and its root qdisc; the reason if this machine
        cannot (not root, no ``unshare``, ``nsenter``, ``ip`` or ``tc``)."""
        if os.geteuid() != 0:
            return "needs root (a network namespace and tc)"
        missing = [t for t in ("unshare", "nsenter", "ip", "tc") if which(t) is None]
        if missing:
            return f"not installed: {', '.join(missing)}"
        self.holder = subprocess.Popen(["unshare", "-n", "sleep", str(WAN_HOLD)])
        ours = os.stat("/proc/self/ns/net").st_ino
        deadline = time.monotonic() + WAN_READY
        while True:  # nothing may be shaped before the holder has its own namespace
            with contextlib.suppress(FileNotFoundError):
                if os.stat(f"/proc/{self.holder.pid}/ns/net").st_ino != ours:
                    break
            if time.monotonic() > deadline or self.holder.poll() is not None:
                return "unshare -n did not make a network namespace"
            time.sleep(0.01)
        self.run("ip", "link", "set", "lo", "up")
        self.run("tc", "qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "1")
        self._class("1:1", WAN_OTHER)
        return None

    @property
    def prefix(self) -> tuple[str, ...]:
        assert self.holder is not None
        return ("nsenter", f"--net=/proc/{self.holder.pid}/ns/net", "--")

    def run(self, *argv: str) -> str:
        done = subprocess.run(
            [*self.prefix, *argv], capture_output=True, text=True, timeout=30, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
        return done.stdout

    def _class(self, classid: str, rate: str) -> None:
        self.run(
            "tc", "class", "add", "dev", "lo", "parent", "1:", "classid", classid, "htb",
            "rate", rate, "ceil", rate, "burst", WAN_BURST, "cburst", WAN_BURST,
            "quantum", str(WAN_QUANTUM),
        )  # fmt: skip

    def shape(self, port: int) -> None:
        """What ``port`` sends goes over a link of ``mbit`` of its own."""
        classid = f"1:{10 + len(self.classes)}"
        self._class(classid, f"{self.mbit}mbit")
        self.run(
            "tc", "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1",
            "u32", "match", "ip", "sport", str(port), "0xffff", "flowid", classid,
        )  # fmt: skip
        self.classes[port] = classid

    def sent(self) -> dict[int, int]:
        """Bytes each shaped port's class has sent (tc's counters)."""
        out = self.run("tc", "-s", "class", "show", "dev", "lo")
        by_class = {
            m.group(1): int(m.group(2))
            for m in re.finditer(r"class htb (\S+) .*?\n\s*Sent (\d+) bytes", out)
        }
        return {port: by_class.get(cid, 0) for port, cid in self.classes.items()}

    def stop(self) -> None:
        if self.holder is not None:
            self.holder.kill()
            self.holder.wait()


async def shaped(b: Bench) -> None:
    """One hop and two hops with each hop over a link of ``--link-mbit``:
    where the link, not the CPU, is the limit, cut-through at the relay is
    what keeps two hops close to one."""
    mbit = b.args.link_mbit
    rows = b.table.section(
        f"rdsd daemons over links of {mbit} Mbit/s (HTB on loopback in a network namespace)"
    )
    links = ShapedLinks(mbit)
    why_not = await asyncio.to_thread(links.start)
    if why_not is not None:
        rows.append(note(f"skipped: {why_not}"))
        links.stop()
        return
    fleet = Daemons(b.root / "shaped-logs", links.prefix)
    dbs: list[JobDB] = []
    took: dict[str, tuple[float, Timeline, float]] = {}
    try:
        progress(f"shaped links: {mbit} Mbit/s per hop, {b.pkg_size / MiB:.0f} MiB")
        server_addr = await read_listening(await fleet.start("server", b.server_cfg.home))
        await asyncio.to_thread(links.shape, server_addr[1])
        relay = b.dep.add_node("relayW", Role.RELAY, server_addr).home
        relay_addr = await read_listening(await fleet.start("relayW", relay))
        await asyncio.to_thread(links.shape, relay_addr[1])
        c1 = b.dep.add_node("clientW1", Role.CLIENT, server_addr).home
        c2 = b.dep.add_node("clientW2", Role.CLIENT, relay_addr).home
        await fleet.start("clientW1", c1)
        await fleet.start("clientW2", c2)
        server = b.admin.db
        routes = {"relayW": "relayW", "clientW1": "clientW1", "clientW2": "relayW"}
        await wait_routed_db(server, routes)
        size = b.pkg_size
        for name, home in (("clientW1", c1), ("clientW2", c2)):
            dbs.append(JobDB(HomePaths(home).db))
            watch = [("server", server, [name]), (name, dbs[-1], [name])]
            took[name] = await one_job(b, watch, [name], b.pkg, size)
        (t1, tl1, s1), (t2, tl2, s2) = took["clientW1"], took["clientW2"]
        sent = await asyncio.to_thread(links.sent)
        line = mbit * 1e6 / 8  # bytes per second
        curl = await asyncio.to_thread(
            time_curl_nginx,
            b.pkg_file,
            b.root / "shaped-baseline",
            HomePaths(b.server_cfg.home),
            HomePaths(c1),
            1,
            links=links,
        )
        if isinstance(curl, str):
            rows.append(Row("curl from nginx over one link", curl))
        else:
            rows.append(
                Row(
                    "curl from nginx over one link (HTTPS), then fsync",
                    f"{mbps(size, curl)}  ({secs(curl)})",
                    f"{rate(size, curl) / line:.2f}",
                    "x the link's rate",
                )
            )
        r, tg, v = "n/a", "", ""
        if not isinstance(curl, str):
            r, tg, v = judged(curl / t1, 1.0, True)
        rows.append(
            Row(
                "one hop over one link, job to installed",
                f"{mbps(size, t1)}  ({secs(t1)}; {rate(size, t1) / line:.2f} x the link's rate)",
                r,
                f"{tg} x curl from nginx",
                v,
            )
        )
        rows.append(breakdown(tl1, "clientW1", s1, size))
        two_hop_rows(rows, size, t2, t1)
        rows.append(breakdown(tl2, "clientW2", s2, size))
        rows.append(
            note(
                f"  bytes through the server's link {sent[server_addr[1]] / MiB:,.0f} MiB, "
                f"the relay's {sent[relay_addr[1]] / MiB:,.0f} MiB (package {size / MiB:,.0f} MiB)"
            )
        )
    finally:
        for db in dbs:
            db.close()
        await fleet.stop()
        await asyncio.to_thread(links.stop)


def bare_import_times() -> list[float]:
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import rdsd.cli.rdsft"], check=True, cwd=ROOT)
        times.append(time.perf_counter() - t0)
    return times


# -- one relay, many idle clients ----------------------------------------------------------------


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit, as the daemon
    does for itself; the daemons started afterwards inherit it. Returns the
    soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass(frozen=True)
class Identity:
    name: str
    cert: Path
    key: Path
    serial: int = 0


def signed_hello(ident: Identity, role: str = "client") -> Callable[[Peer], Hello]:
    """HELLO for ``ident`` with its attach claim naming the parent it reaches,
    signed with its own key, as a daemon's uplink makes it."""
    signer = ClaimSigner.from_file(ident.key)

    def make(parent: Peer) -> Hello:
        claim = signer.attach(ident.name, role, parent.name, time.time_ns() // 1000, time.time())
        return Hello(node=ident.name, role=role, purpose="session", attach=claim)

    return make


def enrolment_rows(idents: list[Identity], role: str) -> list[tuple[object, ...]]:
    """``nodes`` rows that enrol ``idents`` as ``rdsd enroll`` would: the
    certificate's serial and public key are the server's allow-list."""
    now = time.time()
    return [(i.name, role, now, str(i.serial), public_key_der(i.cert.read_bytes())) for i in idents]


def issue_identities(server: HomePaths, names: list[str], out: Path) -> list[Identity]:
    """One client certificate and key per name, signed in this process with the
    deployment's CA: what ``rdsd enroll`` does, without writing a bundle."""
    ca_cert, ca_key = server.ca_cert.read_bytes(), server.ca_key.read_bytes()
    out.mkdir()
    ids = []
    for name in names:
        cert, key, serial = issue_certificate(ca_cert, ca_key, name, "client")
        ident = Identity(name, out / f"{name}.pem", out / f"{name}.key", serial)
        ident.cert.write_bytes(cert)
        fd = os.open(ident.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        ids.append(ident)
    return ids


def why(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:100]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class IdleFleet:
    """Idle child sessions to one relay, all held by this process. Each is a
    genuine client: its own certificate, mutual TLS 1.3, HELLO (purpose
    "session") and the relay's WELCOME (``open_child_session``, as the daemon's
    uplink does); then a PING every ``IDLE_PING`` s, answered by a PONG, so the
    relay's idle timeout never closes it."""

    def __init__(self, addr: tuple[str, int], ca: Path) -> None:
        self.addr = addr
        self.ca = ca
        self.sessions: list[Session] = []
        self.names: list[str] = []  # of the sessions that opened
        self.handshakes: list[float] = []  # seconds per successful open
        self.failed: Counter[str] = Counter()
        self.lost: Counter[str] = Counter()
        self.pongs = 0
        self.untried = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def open(
        self, ids: list[Identity], concurrency: int, limit: float, tick: Callable[[int], None]
    ) -> None:
        """Open a session per identity, ``concurrency`` handshakes at a time;
        ``tick(done)`` after each attempt. No new attempt starts after ``limit``
        seconds; those not tried are counted in ``untried``."""
        todo = iter(ids)
        done = 0
        deadline = time.monotonic() + limit

        async def worker() -> None:
            nonlocal done
            for ident in todo:
                if time.monotonic() > deadline:
                    self.untried += 1
                    continue
                await self._open_one(ident)
                done += 1
                tick(done)

        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(ids)))))

    async def _open_one(self, ident: Identity) -> None:
        t0 = time.perf_counter()
        try:
            ctx = client_context(self.ca, ident.cert, ident.key)
            hello = signed_hello(ident)
            session, _ = await open_child_session(
                *self.addr, ctx, hello, IDLE_HANDSHAKE, IDLE_PONG_WAIT
            )
        except Exception as exc:
            self.failed[why(exc)] += 1
            return
        self.handshakes.append(time.perf_counter() - t0)
        self.sessions.append(session)
        self.names.append(ident.name)
        task = asyncio.create_task(self._keep(session))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _keep(self, session: Session) -> None:
        nonce = 0
        try:
            # Spread the pings: sessions opened together should not all ping together.
            await asyncio.sleep(random.uniform(0.5, 1.0) * IDLE_PING)
            while True:
                nonce += 1
                await session.send(Ping(nonce=nonce))
                while not isinstance(msg := await session.recv(IDLE_PONG_WAIT), Pong):
                    if isinstance(msg, Ping):
                        await session.send(Pong(nonce=msg.nonce))
                self.pongs += 1
                await asyncio.sleep(IDLE_PING)
        except SessionClosed as exc:
            self.lost[why(exc)] += 1

    @property
    def alive(self) -> int:
        return len(self.sessions) - sum(self.lost.values())

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for session in self.sessions:
            with contextlib.suppress(Exception):
                session.abort("bench done")


LOG_EVENTS = (
    "uplink.lost",
    "uplink.connect_failed",
    "child.handshake_failed",
    "child.refused",
    "child.crashed",
    "session.error",
    "node.tick_failed",
)


def log_summary(logs: Path, names: tuple[str, ...]) -> list[Row]:
    """Notes on the trouble a daemon logged (its console log: ``TIME [level] event k=v``)."""
    out = []
    for name in names:
        seen: Counter[str] = Counter()
        first: dict[str, str] = {}
        with contextlib.suppress(OSError), (logs / f"{name}.log").open(errors="replace") as f:
            for line in f:
                m = re.search(r"\] (\S+)\s*(.*)", line)
                if m and m.group(1) in LOG_EVENTS:
                    seen[m.group(1)] += 1
                    first.setdefault(m.group(1), " ".join(m.group(2).split())[:120])
        if seen:
            said = "; ".join(f"{c} x {e} (first: {first[e]})" for e, c in seen.most_common())
            out.append(note(f"  {name} logged: {said}"))
    return out


async def wait_idle_routes(db: JobDB, relay: str, names: set[str], timeout: float) -> int:
    """Until the server's database routes every one of ``names`` over ``relay``
    (the relay's TOPOLOGY arrived) or ``timeout``; returns how many it does."""
    deadline = time.monotonic() + timeout
    while True:
        routed = sum(1 for r in db.nodes() if r.via == relay and r.name in names)
        if routed >= len(names) or time.monotonic() > deadline:
            return routed
        await asyncio.sleep(0.5)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def idle_clients(b: Bench) -> None:
    """docs/DESIGN.md: "10,000 idle clients on one relay under 200 MiB". A server and
    a relay run as ``rdsd run`` daemons; this process opens the idle sessions,
    one client daemon behind the relay shows whether the relay still serves."""
    n = b.args.idle
    rows = b.table.section(
        f"one relay daemon, {n:,} idle client sessions (opened by this process, "
        f"{IDLE_CONCURRENCY} handshakes at a time)"
    )
    limit = raise_fd_limit()
    if limit < n + IDLE_FD_SPARE:
        capped = max(0, limit - IDLE_FD_SPARE)
        rows.append(
            note(f"  RLIMIT_NOFILE is {limit} (hard): {capped:,} sessions instead of {n:,}")
        )
        n = capped
    progress(f"idle: {n:,} client certificates, signed in this process")
    names = [f"idle{i:05d}" for i in range(1, n + 1)]
    t0 = time.perf_counter()
    ids = issue_identities(b.server_cfg.paths, names, b.root / "idle-certs")
    t_issue = time.perf_counter() - t0
    t0 = time.perf_counter()
    # As ``rdsd enroll`` does: with the certificate's serial and key, without
    # which the server refuses every claim the relay forwards for them.
    for ident in ids:
        b.admin.db.enroll(
            ident.name, "client", ident.serial, public_key_der(ident.cert.read_bytes())
        )
    t_enroll = time.perf_counter() - t0
    pkgs = [add_package(b.admin, b.root, "idle", v, IDLE_PKG_MIB * MiB) for v in ("1", "2")]
    size = b.admin.store.data_path(pkgs[0]).stat().st_size
    fleet = Daemons(b.root / "idle-daemon-logs")
    idle: IdleFleet | None = None
    dbs: list[JobDB] = []
    try:
        server = await fleet.start("server", b.server_cfg.home)
        server_addr = await read_listening(server)
        relay_home = b.dep.add_node("relayI", Role.RELAY, server_addr).home
        relay = await fleet.start("relayI", relay_home)
        relay_addr = await read_listening(relay)
        client_home = b.dep.add_node("clientI", Role.CLIENT, relay_addr).home
        await fleet.start("clientI", client_home)
        sdb = b.admin.db
        await wait_routed_db(sdb, {"relayI": "relayI", "clientI": "relayI"})
        dbs += [JobDB(HomePaths(relay_home).db), JobDB(HomePaths(client_home).db)]
        watch = [("server", sdb, ["clientI"]), ("relayI", dbs[0], ["clientI"])]
        watch.append(("clientI", dbs[1], ["clientI"]))
        rss_start = vm_status(relay.pid, "VmRSS")
        progress(
            f"idle: install job through the relay before the idle sessions ({IDLE_PKG_MIB} MiB)"
        )
        t_unloaded, _, _ = await one_job(b, watch, ["clientI"], pkgs[0], size)

        rss_before = vm_status(relay.pid, "VmRSS")
        bench_rss0 = vm_status("self", "VmRSS")
        cpu0, bench_cpu0 = cpu_seconds(relay.pid), time.process_time()
        idle = IdleFleet(relay_addr, b.server_cfg.paths.ca_cert)
        step = max(1, n // 10)
        t_open0 = time.perf_counter()

        def tick(done: int) -> None:
            if done % step == 0 or done == n:
                progress(
                    f"idle: {done:,}/{n:,} tried, {len(idle.sessions):,} open, "
                    f"{sum(idle.failed.values())} failed, {time.perf_counter() - t_open0:.0f} s, "
                    f"relay RSS {vm_status(relay.pid, 'VmRSS'):.0f} MiB"
                )

        open_limit = 300 + 0.12 * n
        progress(f"idle: opening {n:,} sessions to the relay (at most {open_limit:.0f} s)")
        await idle.open(ids, IDLE_CONCURRENCY, open_limit, tick)
        t_open = time.perf_counter() - t_open0
        cpu_open = cpu_seconds(relay.pid) - cpu0
        bench_cpu = time.process_time() - bench_cpu0
        rss_up = vm_status(relay.pid, "VmRSS")
        opened = len(idle.sessions)

        progress("idle: waiting for the server to route every idle client over the relay")
        t0 = time.perf_counter()
        routed = await wait_idle_routes(sdb, "relayI", set(idle.names), 60 + n / 100)
        t_routed = time.perf_counter() - t0
        # Idle now: what the relay costs to keep the sessions, and its settled RSS.
        c0 = cpu_seconds(relay.pid)
        await asyncio.sleep(IDLE_SETTLE)
        cpu_idle = (cpu_seconds(relay.pid) - c0) / IDLE_SETTLE
        rss_after = vm_status(relay.pid, "VmRSS")
        hwm_after = vm_status(relay.pid, "VmHWM")
        per_kib = (rss_after - rss_before) * 1024 / opened if opened else float("nan")
        server_rss = vm_status(server.pid, "VmRSS")
        server_hwm = vm_status(server.pid, "VmHWM")
        bench_rss = vm_status("self", "VmRSS")

        value = f"{rss_after:.0f} MiB (VmHWM {hwm_after:.0f} MiB)"
        if opened >= IDLE_TARGET_N:
            _, _, v = judged(rss_after, IDLE_TARGET_MIB, False)
            rows.append(
                Row(
                    f"relay RSS with {opened:,} idle sessions",
                    value,
                    "",
                    f"< {IDLE_TARGET_MIB} MiB",
                    v,
                )
            )
        else:
            rows.append(Row(f"relay RSS with {opened:,} idle sessions", value))
            guess = rss_before + per_kib * IDLE_TARGET_N / 1024
            _, _, v = judged(guess, IDLE_TARGET_MIB, False)
            rows.append(
                Row(
                    f"  extrapolated to {IDLE_TARGET_N:,} idle sessions",
                    f"{guess:.0f} MiB",
                    "",
                    f"< {IDLE_TARGET_MIB} MiB",
                    v,
                )
            )
        rows.append(
            Row(
                "  per idle session: (RSS after - RSS before) / sessions",
                f"{per_kib:.1f} KiB",
            )
        )
        rows.append(
            note(
                f"  relay RSS: {rss_start:.0f} MiB at start, {rss_before:.0f} MiB before the idle "
                f"sessions (after one install through it), {rss_up:.0f} MiB right after the last "
                f"handshake, {rss_after:.0f} MiB {IDLE_SETTLE:.0f} s later"
            )
        )
        rows.append(
            Row(
                f"  time to open {opened:,} sessions",
                f"{secs(t_open)} ({opened / t_open:,.0f}/s)" if t_open > 0 else "n/a",
            )
        )
        hs = idle.handshakes
        rows.append(
            note(
                f"  per session (connect+TLS+HELLO/WELCOME, {IDLE_CONCURRENCY} in flight): "
                f"median {percentile(hs, 0.5):.3f} s, p99 {percentile(hs, 0.99):.3f} s, "
                f"max {max(hs, default=float('nan')):.3f} s"
            )
        )
        rows.append(
            note(
                f"  relay CPU during the opening: {cpu_open:.1f} s "
                f"({cpu_open / t_open * 100:.0f} % of one core); this process: {bench_cpu:.1f} s"
            )
        )
        if idle.failed:
            rows.append(Row("  sessions that failed to open", f"{sum(idle.failed.values()):,}"))
            for reason, count in idle.failed.most_common(3):
                rows.append(note(f"    {count:,} x {reason}"))
        if idle.untried:
            rows.append(
                Row(
                    "  sessions not tried (opening took too long)",
                    f"{idle.untried:,} after {open_limit:.0f} s",
                )
            )
        routes = f"{routed:,} of {opened:,}"
        rows.append(
            Row(
                "  server routes the idle clients over the relay",
                f"{routes} after {secs(t_routed)}",
            )
        )
        rows.append(Row("  relay CPU with the sessions idle", f"{cpu_idle * 100:.1f} % of a core"))
        rows.append(Row("server RSS", f"{server_rss:.0f} MiB (VmHWM {server_hwm:.0f} MiB)"))
        rows.append(
            note(
                f"  {n:,} certificates signed in {t_issue:.1f} s and enrolled in the server's "
                f"database in {t_enroll:.1f} s; this process holds the client ends: "
                f"{bench_rss:.0f} MiB RSS ({bench_rss0:.0f} MiB before)"
            )
        )

        progress("idle: install job through the loaded relay")
        rows.append(Row("install through the relay, no idle sessions", secs(t_unloaded)))
        try:
            t_loaded, tl, t0 = await one_job(b, watch, ["clientI"], pkgs[1], size, IDLE_STALL)
        finally:
            rows.extend(log_summary(fleet.logs, ("relayI", "server")))
        rows.append(
            Row(
                f"install through the relay with {opened:,} idle sessions",
                secs(t_loaded),
                f"{t_loaded / t_unloaded:.2f}",
                "x without (no target)",
            )
        )
        rows.append(breakdown(tl, "clientI", t0, size))
        rows.append(
            Row(
                "  relay RSS after it",
                f"{vm_status(relay.pid, 'VmRSS'):.0f} MiB "
                f"(VmHWM {vm_status(relay.pid, 'VmHWM'):.0f} MiB)",
            )
        )
        rows.append(
            Row(
                "idle sessions still open at the end",
                f"{idle.alive:,} of {opened:,} ({idle.pongs:,} pings answered)",
            )
        )
        for reason, count in idle.lost.most_common(3):
            rows.append(note(f"    {count:,} lost: {reason}"))
    finally:
        if idle is not None:
            await idle.close()
        await fleet.stop()
        for db in dbs:
            db.close()


# -- main ------------------------------------------------------------------------------------------


def loop_name() -> str:
    loop = asyncio.get_running_loop()
    return f"{type(loop).__module__}.{type(loop).__name__}"


PARTS = ("baselines", "in-process", "daemons", "shaped", "idle")


async def run_all(b: Bench) -> None:
    parts = b.args.only
    if "baselines" in parts:
        await guarded(b, "baselines", baselines(b))
    if "in-process" in parts:
        await in_process(b)
    if "daemons" in parts:
        await guarded(b, "daemons", daemons(b))
    if "shaped" in parts:
        await guarded(b, "shaped", shaped(b))
    if "idle" in parts and b.args.idle > 0:
        await guarded(b, "idle", idle_clients(b))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="smaller: 64 MiB package, 5 fan-out clients, 16 MiB"
    )
    ap.add_argument("--size-mib", type=int, help="package size (default 256, quick 64)")
    ap.add_argument("--clients", type=int, help="fan-out clients (default 20, quick 5)")
    ap.add_argument("--fan-mib", type=int, help="fan-out package size (default 32, quick 16)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per baseline (median), default 3")
    ap.add_argument(
        "--stall",
        type=float,
        default=30.0,
        help="give up on a job when no watched state changed for this long (default 30 s)",
    )
    ap.add_argument(
        "--loop",
        choices=["uvloop", "asyncio"],
        default="uvloop",
        help="event loop of the in-process part (uvloop when installed)",
    )
    ap.add_argument(
        "--idle",
        type=int,
        help="idle client sessions held open to one relay (default 10000, quick 1000; 0: skip)",
    )
    ap.add_argument(
        "--only",
        action="append",
        choices=PARTS,
        help="run only this part (repeatable); default: all",
    )
    ap.add_argument(
        "--link-mbit",
        type=int,
        default=100,
        help="rate of each hop's link in the shaped part, Mbit/s (default 100)",
    )
    ap.add_argument("--dir", help="work here (kept) instead of a temporary directory")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the in-process one-hop run (event-loop thread only)",
    )
    args = ap.parse_args(argv)
    args.size_mib = args.size_mib or (64 if args.quick else 256)
    args.clients = args.clients or (5 if args.quick else 20)
    args.fan_mib = args.fan_mib or (16 if args.quick else 32)
    if args.idle is None:
        args.idle = IDLE_TARGET_N // 10 if args.quick else IDLE_TARGET_N
    args.only = args.only or list(PARTS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dir:
        base = Path(args.dir).resolve()
        base.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="run-", dir=base))
    else:
        root = Path(tempfile.mkdtemp(prefix="rdsd-bench-")) / "deployment"
    started = time.perf_counter()
    try:
        b = Bench(root, args)
        log = configure_logs(root.parent / f"{root.name}-nodes.log", b.events)
        progress(f"work in {root}; node logs in {log.name}")
        if set(args.only) - {"idle"}:
            progress(f"packing a {args.size_mib} MiB package")
            b.pkg = add_package(b.admin, root, "bench", f"{args.size_mib}m", args.size_mib * MiB)
            b.pkg_file = b.admin.store.data_path(b.pkg)
            b.pkg_size = b.pkg_file.stat().st_size
        runner: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
        if args.loop == "uvloop":
            with contextlib.suppress(ImportError):
                import uvloop

                runner = uvloop.run
        runner(run_all(b))
        b.admin.close()
        log.close()
    finally:
        if not args.dir:
            shutil.rmtree(root.parent, ignore_errors=True)
    elapsed = time.perf_counter() - started
    print(
        f"\nrdsd bench{' --quick' if args.quick else ''}: {os.cpu_count()} cores, "
        f"Python {sys.version.split()[0]}, {elapsed:.0f} s; MB = 10^6 bytes, MiB = 2^20 bytes"
    )
    print(b.table.render())
    if b.table.errors:
        print("\nparts that crashed or hung: " + "; ".join(b.table.errors))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
