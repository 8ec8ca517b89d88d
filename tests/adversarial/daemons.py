"""A real server daemon in a subprocess, and what an attack test reads of it.

Resource attacks are measured on a separate process, as an operator would
see them: its resident memory (``VmRSS`` in ``/proc/PID/status``) and its
open descriptors (``/proc/PID/fd``), before, during and after the attack.
The daemon logs JSON, so a test can assert what it logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from protocol import Chunk, Fetch, FetchEnd, FetchFail, Ping, Pong
from rdsd.config import NodeConfig
from rdsd.domain import Role
from tests.helpers import FAST, Deployment, RawChild, rdsd_cmd

REPO = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024


@dataclass
class Daemon:
    """``rdsd run`` for one home; its address, pid and log."""

    proc: subprocess.Popen[bytes]
    address: tuple[str, int]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> int:
        """Resident memory in bytes, now."""
        text = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
        assert match, text
        return int(match.group(1)) * 1024

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The daemon's JSON log lines so far (``name``: only that event)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if name is None or event.get("event") == name:
                        out.append(event)
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None


def configure(cfg: NodeConfig, **settings: Any) -> NodeConfig:
    """Write ``cfg`` with FAST timeouts, JSON logs and ``settings`` to its
    rdsd.toml, for a daemon to read."""
    values: dict[str, Any] = {**FAST, "log_format": "json", **settings}
    new = replace(cfg, **values)
    new.save()
    return new


@contextlib.contextmanager
def daemon(cfg: NodeConfig, timeout: float = 20.0) -> Iterator[Daemon]:
    """Run ``rdsd run`` on ``cfg``'s home until the block ends (SIGTERM, then
    SIGKILL if it hangs); yields once it listens (a client: once it runs,
    with no address)."""
    log_path = cfg.home.parent / f"{cfg.name}.daemon.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [*rdsd_cmd(), "run", "--home", str(cfg.home)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:
        deadline = time.monotonic() + timeout
        address = None
        while address is None:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, f"daemon did not start:\n{log_path.read_text()}"
            text = log_path.read_text()
            match = re.search(r"listening on ([\d.]+):(\d+)", text)
            if match:
                address = (match.group(1), int(match.group(2)))
            elif cfg.role is Role.CLIENT and '"daemon.ready"' in text:
                address = ("", 0)
            else:
                time.sleep(0.05)
        yield Daemon(proc, address, log_path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


async def settled_rss(d: Daemon, seconds: float = 1.0) -> int:
    """RSS once the daemon has been quiet for a moment (the lowest of a few
    samples: a collection or a timer may be running at any one)."""
    samples = []
    for _ in range(5):
        await asyncio.sleep(seconds / 5)
        samples.append(d.rss())
    return min(samples)


class PeakRss:
    """Samples a daemon's RSS every 20 ms while the block runs."""

    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.peak = 0
        self.peak_fds = 0
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, self.d.rss())
                self.peak_fds = max(self.peak_fds, self.d.fds())
            await asyncio.sleep(0.02)

    async def __aenter__(self) -> PeakRss:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


#: How soon the honest child's pings must be answered during an attack. On
#: an idle machine the slowest answer is a few milliseconds to a few hundred;
#: the bound leaves room for a machine shared with other work.
PING_WITHIN = 2.0


class Honest:
    """An honest child with an open session to the daemon: its pings must
    be answered promptly whatever an attacker does meanwhile."""

    def __init__(self, child: RawChild) -> None:
        self.child = child
        self._nonce = 0
        self.slowest = 0.0

    @classmethod
    async def connect(cls, deployment: Deployment, d: Daemon, name: str = "honest") -> Honest:
        cfg = deployment.configs.get(name) or deployment.add_node(name, Role.CLIENT, d.address)
        child = await RawChild.connect(d.address, cfg.home)
        await child.handshake(name, purpose="session")
        return cls(child)

    async def ping(self, within: float = PING_WITHIN) -> float:
        """Ping and wait for the answer; how long it took (fails past ``within``)."""
        self._nonce += 1
        start = time.monotonic()
        await self.child.send(Ping(nonce=self._nonce))
        async with asyncio.timeout(within):
            while True:
                msg = await self.child.recv(within)
                if isinstance(msg, Pong) and msg.nonce == self._nonce:
                    break
        took = time.monotonic() - start
        self.slowest = max(self.slowest, took)
        return took

    async def fetch(self, package: str, timeout: float = 20.0) -> int:
        """Fetch ``package`` whole, as a child that reads promptly; its size."""
        self._nonce += 1
        fid = self._nonce
        await self.child.send(Fetch(fetch_id=fid, package=package, offset=0))
        got = 0
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.child.recv(timeout)
                if isinstance(msg, Chunk) and msg.fetch_id == fid:
                    got += len(msg.data)
                elif isinstance(msg, FetchEnd) and msg.fetch_id == fid:
                    return got
                elif isinstance(msg, FetchFail) and msg.fetch_id == fid:
                    raise AssertionError(f"fetch refused: {msg.reason}")

    async def keep_pinging(self, every: float = 0.2, within: float = PING_WITHIN) -> None:
        """Ping until cancelled; any ping not answered ``within`` fails."""
        while True:
            await self.ping(within)
            await asyncio.sleep(every)

    async def close(self) -> None:
        await self.child.close()


class Attack:
    """``attacks.py`` in a process of its own; ``answers`` once it ends."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.answers: list[str] = []

    @classmethod
    async def start(cls, name: str, d: Daemon, home: Path, ca: Path, count: int) -> Attack:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.adversarial.attacks",
            name,
            d.address[0],
            str(d.address[1]),
            str(home),
            str(ca),
            str(count),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=REPO,
        )
        return cls(proc)

    async def ready(self, timeout: float = 20.0) -> None:
        """Until the attack says it is at its height."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            line = await self.proc.stdout.readline()
        assert line.strip() == b"ready", line

    async def finish(self, timeout: float = 30.0) -> list[str]:
        """Tell it to stop (stdin closes), and its answers."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        async with asyncio.timeout(timeout):
            out = await self.proc.stdout.read()
            assert await self.proc.wait() == 0, out
        self.answers = json.loads(out.decode().strip().splitlines()[-1])
        return self.answers

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
