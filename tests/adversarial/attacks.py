"""Attacks run in a process of their own, so the test's honest child (in
the test's own event loop) measures the server's responsiveness and not
the attacker's load.

``python -m tests.adversarial.attacks NAME HOST PORT HOME CA COUNT`` runs
attack NAME with COUNT connections, as the node of HOME (a client home) or
with no certificate (trusting the CA of CA), and prints one JSON object:
what the server answered each connection. ``ready`` on stdout (a line of
its own) says the attack is at its height, when the test measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import sys
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from protocol import (
    MAGIC,
    MAX_HEADER,
    MAX_PAYLOAD,
    ConnectionClosed,
    Error,
    Fetch,
    Hello,
    Welcome,
)
from protocol.frames import PREFIX
from tests.helpers import RawChild

Address = tuple[str, int]


def answer_of(msg: object) -> str:
    if isinstance(msg, Error):
        return f"error:{msg.code}:{msg.reason}"
    if isinstance(msg, ConnectionClosed):
        return "closed"
    return type(msg).__name__


async def refusal(child: RawChild, timeout: float) -> str:
    try:
        return answer_of(await child.recv(timeout))
    except (ConnectionError, ssl.SSLError, OSError):
        return "closed"
    except TimeoutError:
        return "no answer"


async def big_frames(address: Address, home: Path, ca: Path, count: int) -> list[str]:
    """Preamble and a frame declaring a 1 MiB header and 16 MiB payload, then
    its body minus the last byte, poured in until the server hangs up."""
    frame = MAGIC + PREFIX.pack(MAX_HEADER, MAX_PAYLOAD - 1)
    body = b"\x00" * (64 * 1024)
    total = MAX_HEADER + MAX_PAYLOAD - 1

    async def one() -> str:
        try:
            child = await RawChild.connect(address, home)
        except (OSError, ssl.SSLError, TimeoutError):
            return "no connection"
        try:
            with contextlib.suppress(ConnectionError, ssl.SSLError, OSError, TimeoutError):
                await child.send_raw(frame)
                sent = 0
                while sent + len(body) < total:
                    await asyncio.wait_for(child.send_raw(body), 5)
                    sent += len(body)
            return await refusal(child, 5)
        finally:
            await child.close()

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def fetch_flood(address: Address, home: Path, ca: Path, count: int) -> list[str]:
    """``count`` connections as one node, each with 64 FETCHes of the
    package named in the home's ``attack-package`` file, never reading."""
    package = (home / "attack-package").read_text().strip()
    name = home.name
    children = []
    answers = []
    for _ in range(count):
        child = await RawChild.connect(address, home)
        await child.send(
            Hello(node=name, role="client", purpose="query", attach=child.attach(name, "client"))
        )
        welcome = await child.recv()
        if not isinstance(welcome, Welcome):
            answers.append(answer_of(welcome))
            await child.close()
            continue
        for fid in range(1, 65):
            await child.send(Fetch(fetch_id=fid, package=package, offset=0))
        children.append(child)
        answers.append("fetching")
    print("ready", flush=True)
    # Hold them, reading nothing, until told to stop (stdin closes).
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for child in children:
        child.writer.transport.abort()
    return answers


def no_certificate(ca: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(ca)
    return ctx


async def flood(address: Address, home: Path, ca: Path, count: int) -> list[str]:
    """Connections that never authenticate: plaintext, and TLS without a
    certificate, 200 at a time."""
    trust = no_certificate(ca)
    sem = asyncio.Semaphore(200)
    outcomes: Counter[str] = Counter()

    async def one(i: int) -> None:
        async with sem:
            try:
                async with asyncio.timeout(10):
                    if i % 2:
                        reader, writer = await asyncio.open_connection(*address)
                        writer.write(b"GET / HTTP/1.0\r\n\r\n")
                    else:
                        reader, writer = await asyncio.open_connection(*address, ssl=trust)
                        writer.write(MAGIC)
                    try:
                        data = await reader.read(100)
                        outcomes["answered" if data else "closed"] += 1
                    finally:
                        writer.close()
            except (OSError, ssl.SSLError, EOFError):
                outcomes["refused"] += 1
            except TimeoutError:
                outcomes["timed out"] += 1

    await asyncio.gather(*(one(i) for i in range(count)))
    return [f"{k}:{v}" for k, v in sorted(outcomes.items())]


ATTACKS: dict[str, Callable[[Address, Path, Path, int], Coroutine[Any, Any, list[str]]]] = {
    "big-frames": big_frames,
    "fetch-flood": fetch_flood,
    "flood": flood,
}


def main() -> None:
    name, host, port, home, ca, count = sys.argv[1:7]
    answers = asyncio.run(ATTACKS[name]((host, int(port)), Path(home), Path(ca), int(count)))
    print(json.dumps(answers), flush=True)


if __name__ == "__main__":
    main()
