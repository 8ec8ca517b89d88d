#!/usr/bin/env python3
"""Run a managing server and a client inside one asyncio application.

Shows the embedding API: nodes are async context managers over explicit
configs, listen on port 0, expose their bound address, and are driven with
the same typed admin API the CLI uses. Everything stays on 127.0.0.1 and in
a temporary directory.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from rdsd import Admin, DestState, Node, NodeConfig, Role, enroll, init_node, init_server


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="rdsd-embed-") as tmp:
        base = Path(tmp)
        init_server(base / "server", name="server", listen=("127.0.0.1", 0))
        enroll(base / "server", "laptop", "client", base / "laptop.bundle")
        src = base / "src"
        src.mkdir()
        (src / "hello.txt").write_text("hello from rdsd\n")
        with Admin(base / "server") as admin:
            pid = admin.add_package(src, "hello", "1.0", install="cat hello.txt")

        async with Node(NodeConfig.load(base / "server", poll_interval=0.05)) as server:
            host, port = server.address
            print(f"server listening on {host}:{port}")
            init_node(base / "laptop", Role.CLIENT, base / "laptop.bundle", (host, port))
            async with Node(NodeConfig.load(base / "laptop", poll_interval=0.05)):
                with Admin(base / "server") as admin:
                    job = admin.create_job("install", pid, ["laptop"])
                state = await server.wait_for(
                    job, "laptop", {DestState.INSTALLED, DestState.FAILED}, timeout=30
                )
                print(f"job {job}: laptop {state}")


if __name__ == "__main__":
    asyncio.run(main())
