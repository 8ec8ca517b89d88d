"""Hostile peers against a real server daemon: every attack is refused, an
honest child is served throughout (its pings answered within 2 s, a few
hundred milliseconds at worst on an idle machine),
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
import time
from collections.abc import AsyncIterator

from protocol import ConnectionClosed, Error, ErrorCode, Hello
from rdsd.admin import Admin
from rdsd.domain import Role
from tests.helpers import Deployment, RawChild, make_payload_dir

from .daemons import MIB, Attack, Daemon, Honest, PeakRss, configure, daemon, settled_rss

RSS_CEILING = 150_000_000


def within(after: int, baseline: int, share: float = 0.2) -> bool:
    return after <= baseline * (1 + share)


@contextlib.asynccontextmanager
async def pinging(honest: Honest) -> AsyncIterator[None]:
    """The honest child pings every 0.2 s while the block runs; a ping not
    answered within ``PING_WITHIN`` fails the test."""
    task = asyncio.create_task(honest.keep_pinging())
    try:
        yield
        assert not task.done(), task.exception()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def report(what: str, baseline: int, peak: int, after: int, honest: Honest) -> None:
    print(
        f"\n{what}: baseline {baseline / MIB:.0f} MiB, peak {peak / MIB:.0f} MiB,"
        f" after {after / MIB:.0f} MiB, slowest ping {honest.slowest * 1000:.0f} ms"
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
        report("big frames", baseline, peak.peak, after, honest)
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
        report(f"flood {answers}", baseline, peak.peak, after, honest)
        assert not any(a.startswith("answered") for a in answers), answers
        assert d.events("child.tls_failed")
        assert within(after, baseline), (baseline, peak.peak, after)
        await honest.close()


# -- slow and many handshakes -------------------------------------------------------------


async def test_trickled_handshake_is_cut_at_the_total_deadline(deployment: Deployment) -> None:
    """The preamble and HELLO one byte every half second: each read comes
    well within the 3 s handshake timeout, but the handshake as a whole
    must finish within it, so the connection is cut at 3 s."""
    cfg = configure(deployment.server, handshake_timeout=3.0)
    with daemon(cfg) as d:
        honest = await Honest.connect(deployment, d)
        mallory = deployment.add_node("mallory", Role.CLIENT, d.address)
        started = time.monotonic()
        child = await RawChild.connect(d.address, mallory.home)
        data = b"".join(bytes(b) for b in child.conn.send(Hello(node="mallory", role="client")))
        sent = 0

        async def trickle() -> None:
            nonlocal sent
            for byte in data[:-1]:  # never the last one
                child.writer.write(bytes([byte]))
                sent += 1
                await asyncio.sleep(0.5)

        async with pinging(honest):
            trickling = asyncio.create_task(trickle())
            try:
                answer = await child.recv(10)
            except (ConnectionError, OSError):
                answer = ConnectionClosed(graceful=False)
            cut = time.monotonic() - started
            trickling.cancel()
        await child.close()
        assert isinstance(answer, (Error, ConnectionClosed)), answer
        if isinstance(answer, Error):
            assert answer.code == ErrorCode.TIMEOUT and "no HELLO within 3s" in answer.reason
        assert 2.5 < cut < 6.0, cut
        assert sent >= 5  # several reads, each within the per-read timeout
        assert any("no HELLO within 3s" in e["reason"] for e in d.events("child.refused"))
        await honest.close()


async def test_handshakes_in_progress_are_capped(deployment: Deployment) -> None:
    """With ``[limits] handshakes = 4``, four connections that never start
    TLS hold every slot: a fifth waits in the listen backlog (no answer
    within a second) while the established child is served; when the four
    are cut at the handshake timeout, the fifth gets in."""
    cfg = configure(deployment.server, handshake_timeout=3.0, max_handshakes=4)
    with daemon(cfg) as d:
        honest = await Honest.connect(deployment, d)
        other = deployment.add_node("other", Role.CLIENT, d.address)
        holders = [await asyncio.open_connection(*d.address) for _ in range(4)]
        try:
            async with pinging(honest):
                await asyncio.sleep(0.3)
                started = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await RawChild.connect(d.address, other.home)
                    raise AssertionError("a fifth handshake started with every slot taken")
                late = await RawChild.connect(d.address, other.home)  # waits for a slot
                waited = time.monotonic() - started
                await late.handshake("other", purpose="query")
                await late.close()
            assert 1.5 < waited < 6.0, waited
            for reader, _ in holders:  # each was cut at the handshake timeout
                async with asyncio.timeout(2):
                    assert await reader.read() == b""
        finally:
            for _, writer in holders:
                writer.close()
        await honest.close()


async def test_connections_per_certificate_are_capped(deployment: Deployment) -> None:
    """With ``[limits] connections_per_node = 2``, a third connection with
    the same certificate is refused with an ERROR that names the limit; a
    new session of the same node replaces the old one instead of counting
    extra; another node is served meanwhile."""
    cfg = configure(deployment.server, connections_per_node=2)
    with daemon(cfg) as d:
        honest = await Honest.connect(deployment, d)
        mallory = deployment.add_node("mallory", Role.CLIENT, d.address)
        held = []
        async with pinging(honest):
            for _ in range(2):
                child = await RawChild.connect(d.address, mallory.home)
                await child.handshake("mallory", purpose="query")
                held.append(child)
            third = await RawChild.connect(d.address, mallory.home)
            await third.send(
                Hello(
                    node="mallory",
                    role="client",
                    purpose="query",
                    attach=third.attach("mallory", "client"),
                )
            )
            answer = await third.recv()
            assert isinstance(answer, Error), answer
            assert answer.code == ErrorCode.UNAUTHORIZED
            assert "connections_per_node = 2" in answer.reason
            await third.close()
            # The honest node's new session replaces its old one.
            again = await Honest.connect(deployment, d)
            await again.ping()
            await again.close()
        for child in held:
            await child.close()
        await honest.close()
        refused = [e for e in d.events("child.refused") if "connections_per_node" in e["reason"]]
        assert len(refused) == 1 and refused[0]["peer"] == "mallory"


# -- fetch amplification -------------------------------------------------------------------


async def test_fetch_flood_that_never_reads_is_bounded(deployment: Deployment) -> None:
    """A client with one real job opens 64 fetches on each of 4 connections
    and reads nothing: each session is served 2 fetches at once (the rest
    wait, reading nothing), each serve reads at most two chunks ahead of
    what the transport took, so the server stays under 150 MB and 40 more
    descriptors, and its memory comes back when the client goes."""
    cfg = configure(deployment.server)
    admin = Admin(cfg.home)
    src = make_payload_dir(deployment.root / "big", size=24 * MIB)
    package = admin.add_package(src, "big", "1.0", install="./install.sh")
    with daemon(cfg) as d:
        honest = await Honest.connect(deployment, d)
        mallory = deployment.add_node("mallory", Role.CLIENT, d.address)
        admin.create_job("install", package, ["mallory", "honest"])
        (mallory.home / "attack-package").write_text(package)
        # The baseline is a server that has served a package once (its
        # reader threads exist from then on): the honest child fetches it.
        assert await honest.fetch(package) > 24 * MIB
        baseline, fds = await settled_rss(d), d.fds()
        attack = await Attack.start(
            "fetch-flood", d, mallory.home, deployment.server.paths.ca_cert, 4
        )
        try:
            async with PeakRss(d) as peak, pinging(honest):
                await attack.ready()
                await asyncio.sleep(3)
                during, during_fds = d.rss(), d.fds()
            answers = await attack.finish()
        finally:
            attack.kill()
        after = await settled_rss(d, 4.0)
        await honest.ping()
        assert await honest.fetch(package) > 24 * MIB
        report(
            f"fetch flood {answers} fds {fds}/{peak.peak_fds}", baseline, peak.peak, after, honest
        )
        assert answers == ["fetching"] * 4
        assert peak.peak < RSS_CEILING, (baseline, peak.peak, during)
        assert peak.peak_fds < fds + 40, (fds, peak.peak_fds, during_fds)
        assert within(after, baseline), (baseline, peak.peak, after)
        admin.close()
        await honest.close()
