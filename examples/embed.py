#!/usr/bin/env python3
"""Run a managing server and a client inside one asyncio application.

Shows the embedding API: nodes are async context managers over explicit
configs, listen on port 0 and expose their bound address; ``AsyncAdmin``
drives them without blocking the loop (with the command line's validation
and errors); ``node.events()`` says what happens as it happens. Everything
stays on 127.0.0.1 and in a temporary directory.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import tempfile
from pathlib import Path

import structlog

from rdsd import (
    AsyncAdmin,
    ChildConnected,
    DestChanged,
    DestState,
    EventsDropped,
    JobType,
    Node,
    NodeConfig,
    RdsdError,
    Role,
)

FINAL = {state for state in DestState if state.final}


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="rdsd-embed-") as tmp:
        base = Path(tmp)
        await AsyncAdmin.init_server(base / "server", name="server", listen=("127.0.0.1", 0))
        src = base / "src"
        src.mkdir()
        (src / "hello.txt").write_text("hello from rdsd\n")

        async with (
            Node(NodeConfig.load(base / "server", poll_interval=0.05)) as server,
            AsyncAdmin(base / "server", node=server) as admin,
        ):
            host, port = server.address
            print(f"server listening on {host}:{port}")
            pid = await admin.add_package(src, "hello", "1.0", install="cat hello.txt")
            await admin.enroll("laptop", Role.CLIENT, base / "laptop.bundle")
            await AsyncAdmin.init_node(
                base / "laptop", Role.CLIENT, base / "laptop.bundle", (host, port)
            )

            # Subscribe before acting, so nothing that follows is missed.
            laptop_cfg = NodeConfig.load(base / "laptop", poll_interval=0.05)
            async with (
                server.events(types=ChildConnected) as arrivals,
                Node(laptop_cfg),
                asyncio.timeout(30),
            ):
                arrived = await anext(arrivals)
                assert isinstance(arrived, ChildConnected)
                print(f"{arrived.child} connected ({arrived.role})")

                async with server.events(node="laptop", types=DestChanged) as changes:
                    job = await admin.create_job(JobType.INSTALL, pid, ["laptop"])
                    async for event in changes:
                        if isinstance(event, EventsDropped):
                            # Fell behind: the database has the truth.
                            status = await admin.job_status(job)
                            if status["destinations"][0]["state"] in FINAL:
                                break
                        elif isinstance(event, DestChanged) and event.job == job:
                            old = event.old or "new"
                            print(f"laptop: {old} -> {event.new} {event.detail}".rstrip())
                            if event.new.final:
                                break
                status = await admin.job_status(job)
                print(f"job {job}: laptop {status['destinations'][0]['state']}")


if __name__ == "__main__":
    # The node logs through structlog; an application keeps its own
    # configuration. Here: warnings and errors only, so stdout is ours.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    try:
        asyncio.run(main())
    except RdsdError as exc:  # the root of everything rdsd means to tell you
        sys.exit(f"embed: {exc}")
