"""Shared set-up of the trust attacks: a real server on loopback, a
hand-driven relay or client (``RawChild``) holding a real enrolled
certificate, and a real client served meanwhile."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from protocol import ConnectionClosed, JobNotice, Message, Ping, Pong, Report, ReportAck
from rdsd.admin import Admin
from rdsd.node import Node
from tests.helpers import Deployment, RawChild, wait_state

SCRIPT = "#!/bin/sh\necho installed > marker.txt\n"


def add_package(dep: Deployment, name: str, version: str = "1.0") -> str:
    """A small package whose install command succeeds."""
    src = dep.root / f"src-{name}-{version}"
    src.mkdir(parents=True)
    (src / "install.sh").write_text(SCRIPT)
    (src / "payload.bin").write_bytes(os.urandom(100_000))
    with dep.admin() as admin:
        return admin.add_package(src, name, version, install="sh install.sh")


async def drain(raw: RawChild, seconds: float) -> list[Message]:
    """Everything the parent sends ``raw`` for ``seconds`` (pings answered)."""
    got: list[Message] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while (left := end - loop.time()) > 0:
        try:
            msg = await raw.recv(left)
        except TimeoutError:
            break
        if isinstance(msg, ConnectionClosed):
            break
        if isinstance(msg, Ping):
            await raw.send(Pong(nonce=msg.nonce))
        got.append(msg)
    return got


async def send_report(raw: RawChild, rep: Report) -> None:
    """Send ``rep`` and wait for its acknowledgement: a refused report is
    acknowledged and dropped, so the attacker learns nothing and stops."""
    await raw.send(rep)
    async with asyncio.timeout(5):
        while True:
            msg = await raw.recv()
            if isinstance(msg, ReportAck) and msg.report_id == rep.report_id:
                return
            if isinstance(msg, Ping):
                await raw.send(Pong(nonce=msg.nonce))
            assert not isinstance(msg, ConnectionClosed), "the session was closed"


async def still_open(raw: RawChild) -> None:
    """The session survived: a PING is answered."""
    await raw.send(Ping(nonce=4242))
    async with asyncio.timeout(5):
        while True:
            msg = await raw.recv()
            if isinstance(msg, Pong) and msg.nonce == 4242:
                return
            assert not isinstance(msg, ConnectionClosed), "the session was closed"


def notices_for(messages: list[Message], job: str) -> list[JobNotice]:
    return [m for m in messages if isinstance(m, JobNotice) and m.job == job]


async def bystander_served(dep: Deployment, server: Node, pid: str) -> None:
    """Another child of the same server gets a job done meanwhile."""
    with dep.admin() as admin:
        job = admin.create_job("install", pid, ["bystander"])
        await wait_state(admin, job, "bystander", {"installed"}, timeout=30)


def listings_work(home: Path) -> None:
    """``rdsd nodes``, ``job list`` and each ``job status`` still answer."""
    with Admin(home) as admin:
        admin.nodes()
        for job in admin.jobs():
            admin.job_status(job["id"])
