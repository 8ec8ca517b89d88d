"""Shared test helpers: a real deployment in tmp_path with nodes in this loop.

Every node listens on 127.0.0.1 port 0 and talks real mutual TLS 1.3 to the
others; timeouts are shortened so fault paths finish quickly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import stat
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from protocol import NEED_DATA, Connection, ConnectionClosed, Hello, Message, Side, Welcome
from rdsd.admin import Admin, enroll, init_node
from rdsd.config import HomePaths, NodeConfig, Role
from rdsd.node import Node
from rdsd.security import client_context

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
        enroll(self.server.home, name, role.value, bundle)
        listen = ("127.0.0.1", 0) if role is Role.RELAY else None
        init_node(self.root / name, role, bundle, parent, listen)
        cfg = NodeConfig.load(self.root / name, **FAST)
        self.configs[name] = cfg
        return cfg

    def reparent(self, name: str, parent: tuple[str, int]) -> NodeConfig:
        cfg = replace(self.configs[name], parent=parent)
        self.configs[name] = cfg
        return cfg


@contextlib.asynccontextmanager
async def running(*cfgs: NodeConfig) -> AsyncIterator[list[Node]]:
    """Run nodes in this loop; stop them all (in reverse) on the way out."""
    async with contextlib.AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(Node(cfg)) for cfg in cfgs]
        yield nodes


async def wait_state(
    admin: Admin, job: str, node: str, states: set[str], timeout: float = 30.0
) -> str:
    """Poll the job database (as an operator would) until a state is reached."""
    async with asyncio.timeout(timeout):
        while True:
            for d in admin.job_status(job)["destinations"]:
                if d["node"] == node and d["state"] in states:
                    return str(d["state"])
            await asyncio.sleep(0.05)


def rdsd_cmd() -> list[str]:
    return [sys.executable, "-m", "rdsd.cli"]


def rdsft_cmd() -> list[str]:
    return [sys.executable, "-m", "rdsd.rdsft"]


def is_executable(path: Path) -> bool:
    return bool(path.stat().st_mode & stat.S_IXUSR)


class RawChild:
    """A hand-driven child: TLS with some node's identity, then whatever
    bytes or messages the test decides, decoded as a real child would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = Connection(Side.CHILD)

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
        return cls(reader, writer)

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

    async def handshake(self, node: str, role: str = "client", purpose: str = "query") -> None:
        await self.send(Hello(node=node, role=role, purpose=purpose))
        welcome = await self.recv()
        assert isinstance(welcome, Welcome), welcome

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await self.writer.wait_closed()
