"""What a parent holds for an idle child session.

A relay holds thousands of children that say nothing but PING for hours, so
what each idle session keeps is most of its memory (tests/bench/README.md,
"One relay, many idle clients"). Objects made for fetches, side work, a
send in progress or a log line must not be made for every session up front.
The bound here is generous (what this test counts was 11.3 KiB a session
before those were made lazily, 5.7 KiB after); it catches eager
per-session objects coming back, not a few bytes.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from pathlib import Path
from typing import Any

from rdsd.domain import HelloPurpose, Role
from rdsd.parent.downlinks import Child
from tests.helpers import Deployment, RawChild, children, running, wait_until

SESSIONS = 30
#: Python memory the parent may hold per idle child session (traced).
PER_SESSION_BOUND = 8 * 1024

ROOT = str(Path(__file__).resolve().parents[2])
OURS = (f"{ROOT}/rdsd/", f"{ROOT}/protocol/")
# The transport and TLS objects under a session: the floor, not ours.
FLOOR = ("/asyncio/sslproto.py", "/asyncio/selector_events.py", "/ssl.py", "/socket.py")


def parent_side(trace: tracemalloc.StatisticDiff) -> bool:
    """Allocated by the parent's own code (a frame in rdsd/ or protocol/, no
    frame in the tests, whose clients run in this process too), and not by
    the transport or TLS layer under it."""
    files = [f.filename for f in trace.traceback]
    if any(f.startswith(f"{ROOT}/tests/") for f in files):
        return False
    if files and files[-1].endswith(FLOOR):  # where it was allocated
        return False
    return any(f.startswith(OURS) for f in files)


async def test_an_idle_child_session_keeps_little_on_its_relay(deployment: Deployment) -> None:
    async with running(deployment.server) as (server,):
        relay_cfg = deployment.add_node("relay1", Role.RELAY, server.address)
        names = [f"idle{i:02d}" for i in range(SESSIONS + 1)]
        async with running(relay_cfg) as (relay,):
            homes = {n: deployment.add_node(n, Role.CLIENT, relay.address).home for n in names}
            raws: list[RawChild] = []

            async def open_session(name: str) -> None:
                raw = await RawChild.connect(relay.address, homes[name])
                raws.append(raw)
                await raw.handshake(name, purpose="session")

            def all_routed(wanted: list[str]) -> bool:
                # The relay told the server about them: its passes over the
                # new children ran, and it keeps what it told.
                rows = {n: server.db.node(n) for n in wanted}
                return all(r is not None and r.via == "relay1" for r in rows.values())

            try:
                # One first, so what is made once (caches, first-use imports)
                # is not counted per session.
                await open_session(names[0])
                await wait_until(lambda: all_routed(names[:1]), 10, what="first child routed")
                gc.collect()
                tracemalloc.start(30)
                try:
                    before = tracemalloc.take_snapshot()
                    for name in names[1:]:
                        await open_session(name)
                    await wait_until(lambda: all_routed(names), 10, what="all children routed")
                    gc.collect()
                    after = tracemalloc.take_snapshot()
                finally:
                    tracemalloc.stop()
                diffs = [d for d in after.compare_to(before, "traceback") if parent_side(d)]
                per_session = sum(d.size_diff for d in diffs) / SESSIONS
                worst = sorted(diffs, key=lambda d: -d.size_diff)[:8]
                assert per_session < PER_SESSION_BOUND, (
                    f"{per_session:.0f} bytes per idle session; largest: "
                    + "; ".join(f"{d.size_diff // SESSIONS} B at {d.traceback[-1]}" for d in worst)
                )
                # And none of them holds what only a fetch or side work needs.
                for name in names:
                    assert not children(relay)[name].holds_fetch_state, name
            finally:
                for raw in raws:
                    await raw.close()


class _Session:
    """Just enough of a session for a Child."""

    class peer:
        name = "c1"
        role = Role.CLIENT


async def test_a_childs_fetch_state_is_made_on_first_use_and_dropped_after() -> None:
    child = Child(_Session(), HelloPurpose.SESSION, fetch_limit=3)  # type: ignore[arg-type]
    assert not child.holds_fetch_state
    assert child.serving == {}
    assert not child.holds_fetch_state  # looking makes nothing

    release = asyncio.Event()

    async def serve() -> None:
        async with child.fetch_slots:
            await release.wait()

    task = asyncio.create_task(serve())
    task.add_done_callback(lambda _: child.serve_ended(7))
    child.serve_started(7, task)
    side = asyncio.Event()

    async def work() -> None:
        await side.wait()

    child.spawn(work())
    await asyncio.sleep(0)
    assert child.holds_fetch_state
    assert child.serving == {7: task}
    assert child.fetch_slots._value == 2  # one of its 3 slots taken
    release.set()
    side.set()
    await wait_until(lambda: not child.holds_fetch_state, 5, what="fetch state dropped")
    assert child.serving == {}


def _no_dict(obj: Any) -> bool:
    return not hasattr(obj, "__dict__")


def test_per_connection_objects_have_no_instance_dict() -> None:
    """Each holds a dict of its own otherwise (about 0.1-0.3 KiB apiece)."""
    from protocol import Connection, Side
    from protocol.frames import FrameDecoder

    conn = Connection(Side.PARENT)
    assert _no_dict(conn)
    assert _no_dict(FrameDecoder())
    assert _no_dict(Child(object(), HelloPurpose.SESSION))  # type: ignore[arg-type]
