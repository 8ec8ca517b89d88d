#!/usr/bin/env python3
"""A live progress printer for one job, driven by a node's events.

Starts a managing server and a client in this process (127.0.0.1, port 0, a
temporary directory), installs a 32 MiB package on the client and prints
what the client does as it does it: the job arriving, a progress bar while
the bytes come in, the package stored, every state change. Nothing polls;
each line is one event.

    python examples/progress.py
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
from pathlib import Path

import structlog

from rdsd import (
    AsyncAdmin,
    ChildConnected,
    DestChanged,
    Event,
    EventsDropped,
    JobReceived,
    JobType,
    Node,
    NodeConfig,
    PackageStored,
    RdsdError,
    Role,
    Subscription,
    TransferProgress,
)

MIB = 1024 * 1024
SIZE = 32 * MIB
WIDTH = 30


def bar(done: int, total: int) -> str:
    filled = WIDTH * done // max(total, 1)
    return "[" + "#" * filled + " " * (WIDTH - filled) + "]"


def describe(event: Event) -> str | None:
    """One line for an event, or None for one this printer does not show."""
    if isinstance(event, JobReceived):
        return f"job {event.job} received: {event.job_type} {event.package}"
    if isinstance(event, TransferProgress):
        pct = 100 * event.done // max(event.total, 1)
        return (
            f"{bar(event.done, event.total)} {pct:3d}%  {event.done / MIB:5.1f} of "
            f"{event.total / MIB:.1f} MiB  {event.rate / MIB:7.1f} MiB/s"
        )
    if isinstance(event, PackageStored):
        return f"{event.package} stored ({event.size / MIB:.1f} MiB)"
    if isinstance(event, DestChanged):
        detail = f" ({event.detail})" if event.detail else ""
        return f"{event.node}: {event.old or 'new'} -> {event.new}{detail}"
    if isinstance(event, EventsDropped):
        return f"... {event.count} events dropped (the printer fell behind)"
    return None


async def follow(sub: Subscription, job: str, package: str) -> DestChanged:
    """Print this job's events until its destination is final; return that change."""
    async for event in sub:
        # PackageStored has no job attribute: match it by package.
        ours = getattr(event, "job", job) == job and getattr(event, "package", package) == package
        line = describe(event) if ours else None
        if line is not None:
            print(line, flush=True)
        if ours and isinstance(event, DestChanged) and event.new.final:
            return event
    raise RuntimeError("the client stopped before the job finished")


async def main() -> int:
    with tempfile.TemporaryDirectory(prefix="rdsd-progress-") as tmp:
        base = Path(tmp)
        src = base / "src"
        src.mkdir()
        (src / "payload.bin").write_bytes(os.urandom(SIZE))
        await AsyncAdmin.init_server(base / "server", listen=("127.0.0.1", 0))
        async with (
            Node(NodeConfig.load(base / "server", poll_interval=0.05)) as server,
            AsyncAdmin(base / "server", node=server) as admin,
        ):
            pid = await admin.add_package(src, "bigapp", "1.0", install="ls -l payload.bin")
            await admin.enroll("ws-001", Role.CLIENT, base / "ws-001.bundle")
            await AsyncAdmin.init_node(
                base / "ws-001", Role.CLIENT, base / "ws-001.bundle", server.address
            )
            # A short progress interval so a fast loopback transfer still
            # shows a few steps; the default is one event a second at most.
            client_cfg = NodeConfig.load(base / "ws-001", poll_interval=0.05, progress_interval=0.1)
            async with (
                server.events(types=ChildConnected) as arrivals,
                Node(client_cfg) as client,
                asyncio.timeout(60),
            ):
                await anext(arrivals)
                # Everything the client emits, subscribed before the job exists.
                async with client.events(node="ws-001", maxsize=10_000) as sub:
                    job = await admin.create_job(JobType.INSTALL, pid, ["ws-001"])
                    last = await follow(sub, job, pid)
        print(f"done: {last.node} {last.new}")
        return 0 if last.new == "installed" else 1


if __name__ == "__main__":
    # The node logs through structlog; an application keeps its own
    # configuration. Here: warnings and errors only, so stdout is ours.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    try:
        sys.exit(asyncio.run(main()))
    except RdsdError as exc:
        sys.exit(f"progress: {exc}")
