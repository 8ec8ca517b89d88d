"""A relay's presence pass reads what changed, not its whole subtree: a
storm of children connecting made every pass read every connected node
(O(N) per pass, O(N^2) for the storm) and took most of a relay's CPU."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import structlog

from protocol import Message, Presence
from rdsd.node.housekeeping import Housekeeper
from rdsd.state import JobDB
from tests.helpers import sqlite_steps

N = 2000


class Sent:
    closed = False

    def __init__(self) -> None:
        self.messages: list[Message] = []

    def send_nowait(self, msg: Message) -> None:
        self.messages.append(msg)

    def presence(self) -> tuple[set[str], set[str], bool]:
        """Who the messages since the last call said went online and offline."""
        got = [m for m in self.messages if isinstance(m, Presence)]
        self.messages.clear()
        online = {n for m in got for n in m.online}
        offline = {n for m in got for n in m.offline}
        return online, offline, any(m.reset for m in got)


def connect(db: JobDB, name: str) -> None:
    db.upsert_node(name, "client", via=name, claim=(f"claim-{name}".encode(), 1, "relay1"))
    db.presence_online(name, {name: ("relay1", "rdsd 1")})


@pytest.fixture
def relay(tmp_path: Path) -> tuple[Housekeeper, JobDB, Sent]:
    db = JobDB(tmp_path / "state.db")
    for i in range(N):
        connect(db, f"c{i:04d}")
    session = Sent()
    node = SimpleNamespace(
        cfg=SimpleNamespace(name="relay1"),
        log=structlog.get_logger("test"),
        db=db,
        uplink=SimpleNamespace(session=session),
        parts=SimpleNamespace(forwards_up=True),
    )
    return Housekeeper(cast(Any, node)), db, session


async def test_a_pass_after_one_child_connects_reads_that_child(
    relay: tuple[Housekeeper, JobDB, Sent],
) -> None:
    hk, db, session = relay
    with sqlite_steps(db._db) as full:
        await hk.send_presence()  # a new session: everything, with reset
    online, offline, reset = session.presence()
    assert reset and len(online) == N and not offline

    connect(db, "new1")
    hk.presence_changed(["new1"])
    with sqlite_steps(db._db) as one:
        await hk.send_presence()
    assert session.presence() == ({"new1"}, set(), False)
    assert one[0] * 50 < full[0], (one[0], full[0])

    assert db.presence_offline("c0007") == ["c0007"]
    hk.presence_changed(["c0007"])
    await hk.send_presence()
    assert session.presence() == (set(), {"c0007"}, False)

    hk.presence_changed(["c0008"])  # named, but nothing changed for it
    await hk.send_presence()
    assert session.presence() == (set(), set(), False)


async def test_anything_may_have_changed_reads_everything_and_sends_the_difference(
    relay: tuple[Housekeeper, JobDB, Sent],
) -> None:
    hk, db, session = relay
    await hk.send_presence()
    session.presence()
    connect(db, "new2")
    db.presence_offline("c0001")
    hk.presence_changed(None)
    await hk.send_presence()
    assert session.presence() == ({"new2"}, {"c0001"}, False)
