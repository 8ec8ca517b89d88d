"""Shared test helpers: a real deployment in tmp_path with nodes in this loop.

Every node listens on 127.0.0.1 port 0 and talks real mutual TLS 1.3 to the
others; timeouts are shortened so fault paths finish quickly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sqlite3
import ssl
import stat
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from protocol import (
    NEED_DATA,
    Connection,
    ConnectionClosed,
    Hello,
    Message,
    Report,
    Side,
    Welcome,
)
from rdsd.admin import Admin, enroll, init_node
from rdsd.claims import ClaimSigner
from rdsd.config import HomePaths, NodeConfig
from rdsd.domain import Role
from rdsd.net.session import Session
from rdsd.node import Node
from rdsd.security import client_context

if TYPE_CHECKING:
    from rdsd.parent.downlinks import Child

FAST = {
    "handshake_timeout": 5.0,
    "idle_timeout": 10.0,
    "ping_interval": 2.0,
    "poll_interval": 0.05,
    "reconnect_min": 0.05,
    "reconnect_max": 0.5,
    "install_timeout": 20.0,
}

INSTALL_SCRIPT = """#!/bin/sh
set -e
out="$RDSD_TEST_OUT/$RDSD_NODE"
mkdir -p "$out"
{
  echo "node=$RDSD_NODE"
  echo "package=$RDSD_PACKAGE"
  echo "version=$RDSD_VERSION"
  echo "job=$RDSD_JOB"
  echo "cwd=$(pwd)"
} > "$out/env.txt"
cp payload.bin "$out/payload.bin"
"""


def make_payload_dir(root: Path, size: int = 3 * 1024 * 1024 + 123) -> Path:
    """A package source: an install script and a payload of ``size`` bytes."""
    src = root / "src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "install.sh").write_text(INSTALL_SCRIPT)
    (src / "install.sh").chmod(0o755)
    with (src / "payload.bin").open("wb") as f:
        block = os.urandom(64 * 1024)
        left = size
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)
    return src


@dataclass
class Deployment:
    """A server home plus enrolled relay and client homes, not yet running."""

    root: Path
    server: NodeConfig
    configs: dict[str, NodeConfig] = field(default_factory=dict)

    def admin(self, name: str = "server") -> Admin:
        home = self.server.home if name == "server" else self.configs[name].home
        return Admin(home)

    def add_node(self, name: str, role: Role, parent: tuple[str, int]) -> NodeConfig:
        bundle = self.root / f"{name}.bundle"
        enroll(self.server.home, name, role, bundle)
        listen = ("127.0.0.1", 0) if role is Role.RELAY else None
        init_node(self.root / name, role, bundle, parent, listen)
        cfg = NodeConfig.load(self.root / name, **FAST)
        self.configs[name] = cfg
        return cfg

    def reparent(self, name: str, parent: tuple[str, int]) -> NodeConfig:
        cfg = replace(self.configs[name], parent=parent)
        self.configs[name] = cfg
        return cfg


class TrafficCounter:
    """A node's traffic observer: bytes framed and package bytes served, per peer."""

    def __init__(self) -> None:
        self.frames: Counter[str] = Counter()
        self.served: Counter[str] = Counter()

    def frames_sent(self, peer: str, nbytes: int) -> None:
        self.frames[peer] += nbytes

    def package_served(self, peer: str, nbytes: int) -> None:
        self.served[peer] += nbytes


def traffic(node: Node) -> TrafficCounter:
    """The counter ``running`` attached to ``node``."""
    assert isinstance(node.observer, TrafficCounter)
    return node.observer


@contextlib.asynccontextmanager
async def running(*cfgs: NodeConfig) -> AsyncIterator[list[Node]]:
    """Run nodes in this loop, each with a TrafficCounter; stop them all (in
    reverse) on the way out."""
    async with contextlib.AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(Node(cfg, observer=TrafficCounter())) for cfg in cfgs
        ]
        yield nodes


# -- waiting, one way -----------------------------------------------------------------
#
# Tests look at state the way an operator would, through another connection
# to a node's database or at a node's sessions, so they poll; every wait is
# bounded and says what it waited for when it times out.


async def wait_until(
    pred: Callable[[], object],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str | Callable[[], str] = "",
) -> None:
    """Poll ``pred`` until it is true; fail the test after ``timeout``
    (``what``, or what it returns then, says what was awaited)."""
    try:
        async with asyncio.timeout(timeout):
            while not pred():  # noqa: ASYNC110
                await asyncio.sleep(interval)
    except TimeoutError:
        said = what() if callable(what) else what
        raise AssertionError(f"timed out after {timeout}s waiting for {said or pred}") from None


async def wait_state(
    admin: Admin, job: str, node: str, states: set[str], timeout: float = 30.0
) -> str:
    """Until ``node``'s state for ``job`` in ``admin``'s database is one of ``states``."""

    def state() -> str | None:
        dest = admin.db.dest(job, node)
        return str(dest.state) if dest is not None and dest.state in states else None

    await wait_until(lambda: state() is not None, timeout, 0.05, f"{job}/{node} in {states}")
    return str(state())


def routed(admin: Admin, node: str, via: str) -> bool:
    row = admin.db.node(node)
    return row is not None and row.via == via


async def wait_routed(admin: Admin, node: str, via: str, timeout: float = 10.0) -> None:
    await wait_until(lambda: routed(admin, node, via), timeout, 0.05, f"{node} routed via {via}")


def children(parent: Node) -> dict[str, Child]:
    """The open child sessions of a server or relay, by node name."""
    assert parent.downlinks is not None
    return parent.downlinks.children


async def wait_child(parent: Node, name: str, present: bool = True, timeout: float = 10) -> None:
    """Until ``name`` has (or no longer has) an open session on ``parent``."""
    sessions = children(parent)
    await wait_until(
        lambda: (name in sessions) == present, timeout, what=f"{name} present={present}"
    )


def rdsd_cmd() -> list[str]:
    return [sys.executable, "-m", "rdsd.cli"]


def rdsft_cmd() -> list[str]:
    return [sys.executable, "-m", "rdsd.cli.rdsft"]


def is_executable(path: Path) -> bool:
    return bool(path.stat().st_mode & stat.S_IXUSR)


class RawChild:
    """A hand-driven child: TLS with some node's identity, then whatever
    bytes or messages the test decides, decoded as a real child would. It
    holds that node's key, so it can sign claims as the node (``attach``,
    ``sign``) or leave them unsigned."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        signer: ClaimSigner | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = Connection(Side.CHILD)
        self.signer = signer
        self.parent = ""
        self.counter = time.time_ns() // 1000
        with contextlib.suppress(Exception):
            self.parent = Session.identify(writer.transport).name

    @classmethod
    async def connect(
        cls, address: tuple[str, int], home: Path, ca_home: Path | None = None
    ) -> RawChild:
        """TLS as the node of ``home``, trusting the CA of ``ca_home`` (default:
        the same home)."""
        ident, trust = HomePaths(home), HomePaths(ca_home or home)
        ctx = client_context(trust.ca_cert, ident.cert, ident.key)
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection(*address, ssl=ctx)
        return cls(reader, writer, ClaimSigner.from_file(ident.key))

    def attach(
        self,
        node: str,
        role: str = "client",
        parent: str | None = None,
        counter: int | None = None,
        at: float | None = None,
    ) -> bytes:
        """An attach claim signed with this connection's key (by default:
        ``node`` under the parent it is connected to, counted now)."""
        assert self.signer is not None
        if counter is None:
            self.counter += 1
            counter = self.counter
        return self.signer.attach(
            node, role, parent or self.parent, counter, time.time() if at is None else at
        )

    def sign(self, report: Report) -> Report:
        """``report`` signed with this connection's key."""
        assert self.signer is not None
        return self.signer.report(report)

    async def send(self, msg: Message) -> None:
        self.writer.writelines(self.conn.send(msg))
        await self.writer.drain()

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self, timeout: float = 5.0) -> Message | ConnectionClosed:
        async with asyncio.timeout(timeout):
            while True:
                event = self.conn.next_event()
                if event is not NEED_DATA:
                    assert isinstance(event, (Message, ConnectionClosed))
                    return event
                try:
                    data = await self.reader.read(65536)
                except (ConnectionError, ssl.SSLError):
                    data = b""
                self.conn.receive_data(data)

    async def handshake(
        self, node: str, role: str = "client", purpose: str = "query", attach: bytes | None = None
    ) -> None:
        """HELLO (with this node's attach claim unless ``attach`` says
        otherwise) and the parent's WELCOME."""
        claim = self.attach(node, role) if attach is None and self.signer is not None else attach
        await self.send(Hello(node=node, role=role, purpose=purpose, attach=claim or b""))
        welcome = await self.recv()
        assert isinstance(welcome, Welcome), welcome

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await self.writer.wait_closed()


def enroll_node(deployment: Deployment, name: str, role: Role) -> Path:
    """Enrol ``name`` on the deployment's server (a bundle is written, not used)."""
    bundle = deployment.root / f"{name}.enrolled.bundle"
    enroll(deployment.server.home, name, role, bundle)
    return bundle


# -- "nothing changed" ------------------------------------------------------------------

_DB_FILES = {"state.db", "state.db-wal", "state.db-shm"}


def snapshot(*roots: Path) -> dict[str, str]:
    """Everything a refused command must leave alone under ``roots``: each
    file's SHA-256 by path (directories too, so a new empty one shows), and
    each SQLite database's rows, read through a fresh connection (the WAL
    files themselves change on a mere read, their content does not)."""
    out: dict[str, str] = {}
    for root in roots:
        if not root.exists():
            out[str(root)] = "absent"
            continue
        for path in sorted(root.rglob("*")):
            if path.name in _DB_FILES:
                continue
            if path.is_dir():
                out[str(path)] = "dir"
            elif path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        for db in sorted(root.rglob("state.db")):
            conn = sqlite3.connect(db)
            try:
                out[f"{db}:rows"] = "\n".join(conn.iterdump())
            finally:
                conn.close()
    return out


@contextlib.contextmanager
def sqlite_steps(conn: sqlite3.Connection, every: int = 100) -> Iterator[list[int]]:
    """Count the SQLite virtual-machine steps (in units of ``every``) run on
    ``conn`` inside the block, in the one-element list yielded: a measure of
    the rows read that does not depend on timing."""
    count = [0]

    def tick() -> int:
        count[0] += 1
        return 0

    conn.set_progress_handler(tick, every)
    try:
        yield count
    finally:
        conn.set_progress_handler(None, every)
