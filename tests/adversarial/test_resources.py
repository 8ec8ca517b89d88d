"""Hostile peers against a real server daemon: every attack is refused, an
honest child is served throughout (its pings answered within a second),
and the daemon's memory stays under a stated bound during the attack and
comes back after it. Attacks run in a process of their own (``attacks.py``).

Bounds (the daemon idles at about 50-60 MB here):

- 150 connections that each send the preamble and a frame declaring a
  1 MiB header and 16 MiB payload: peak RSS under 150 MB; after, within
  20 % of the baseline.
- 4 connections with 64 fetches each that never read: peak RSS under
  150 MB and fewer than 40 descriptors more than at rest; after, within
  20 % of the baseline.
- 2,000 unauthenticated connections (plaintext and TLS without a
  certificate): after, within 20 % of the baseline.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from protocol import ErrorCode
from rdsd.domain import Role
from tests.helpers import Deployment

from .daemons import MIB, Attack, Daemon, Honest, PeakRss, configure, daemon, settled_rss

RSS_CEILING = 150_000_000


def within(after: int, baseline: int, share: float = 0.2) -> bool:
    return after <= baseline * (1 + share)


@contextlib.asynccontextmanager
async def pinging(honest: Honest) -> AsyncIterator[None]:
    """The honest child pings every 0.2 s while the block runs; a ping not
    answered within a second fails the test."""
    task = asyncio.create_task(honest.keep_pinging())
    try:
        yield
        assert not task.done(), task.exception()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def report(what: str, baseline: int, peak: int, after: int) -> None:
    print(
        f"\n{what}: baseline {baseline / MIB:.0f} MiB, peak {peak / MIB:.0f} MiB,"
        f" after {after / MIB:.0f} MiB"
    )


async def run_attack(
    name: str, d: Daemon, deployment: Deployment, home_name: str | None, count: int
) -> list[str]:
    home = deployment.configs[home_name].home if home_name else deployment.root
    attack = await Attack.start(name, d, home, deployment.server.paths.ca_cert, count)
    try:
        return await attack.finish(60)
    finally:
        attack.kill()


# -- memory before HELLO -------------------------------------------------------------


async def test_big_frames_before_hello_are_refused_from_their_prefix(
    deployment: Deployment,
) -> None:
    """150 connections send the preamble and a frame declaring a 1 MiB header
    and 16 MiB payload, then pour in its body: each is refused from the
    frame's 8-byte prefix (64 KiB is the cap before a session), the server
    never holds the bodies, and an honest child is answered throughout."""
    cfg = configure(deployment.server)
    with daemon(cfg) as d:
        honest = await Honest.connect(deployment, d)
        deployment.add_node("mallory", Role.CLIENT, d.address)
        baseline = await settled_rss(d)
        async with PeakRss(d) as peak, pinging(honest):
            answers = await run_attack("big-frames", d, deployment, "mallory", 150)
        after = await settled_rss(d, 4.0)
        await honest.ping()
        report("big frames", baseline, peak.peak, after)
        # Each was refused from its prefix: the ERROR goes out, then the
        # connection is dropped (an asyncio peer that is still writing sees
        # the reset first), and the server says why in its log.
        assert len(answers) == 150
        assert all(a.startswith("error:2:") or a == "closed" for a in answers), answers
        refusals = [
            e
            for e in d.events("session.error")
            if e["code"] == ErrorCode.FRAME_TOO_LARGE
            and "before the session is established" in e["reason"]
        ]
        assert len(refusals) == 150, len(refusals)
        assert peak.peak < RSS_CEILING, (baseline, peak.peak)
        assert within(after, baseline), (baseline, peak.peak, after)
        await honest.close()


# -- the unauthenticated flood ------------------------------------------------------------


async def test_unauthenticated_flood_memory_returns(deployment: Deployment) -> None:
    """2,000 connections that never authenticate (half send plaintext, half
    try TLS without a certificate): refused, the honest child is answered
    throughout, and the server's memory comes back afterwards."""
    cfg = configure(deployment.server)
    with daemon(cfg) as d:
        honest = await Honest.connect(deployment, d)
        baseline = await settled_rss(d)
        async with PeakRss(d) as peak, pinging(honest):
            answers = await run_attack("flood", d, deployment, None, 2000)
        after = await settled_rss(d, 4.0)
        await honest.ping()
        report(f"flood {answers}", baseline, peak.peak, after)
        assert not any(a.startswith("answered") for a in answers), answers
        assert d.events("child.tls_failed")
        assert within(after, baseline), (baseline, peak.peak, after)
        await honest.close()
