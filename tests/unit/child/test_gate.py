"""The transfer gate decides on a fake clock: when a fetch waits, when a
running one pauses, what status says meanwhile, and that a reload or a
notice of change makes it decide again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from rdsd.child.gate import TransferGate
from rdsd.config import NodeConfig
from rdsd.domain import JobPace, Role
from rdsd.errors import WindowClosed
from rdsd.util.parse import parse_window

NIGHT = parse_window("22:00-06:00")
EARLY = parse_window("05:00-08:00")


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC0")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def config(tmp_path: Path, **values: Any) -> NodeConfig:
    return replace(
        NodeConfig(home=tmp_path, role=Role.CLIENT, name="c1", parent=("127.0.0.1", 1)),
        **values,
    )


async def test_a_fetch_waits_for_its_window_and_says_until_when(tmp_path: Path) -> None:
    clock = FakeClock(at("2026-12-02T21:59:00"))
    gate = TransferGate(config(tmp_path, transfer_windows=(NIGHT,)), clock=clock)
    waiting = asyncio.create_task(gate.wait_transfer("tool-1.0"))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    held = "waiting for window 22:00 (transfer, opens 2026-12-02T22:00:00Z)"
    assert gate.held("tool-1.0") == held
    assert gate.paused("tool-1.0")
    clock.now = at("2026-12-02T22:00:00")
    gate.notify()
    async with asyncio.timeout(1):
        await waiting
    assert gate.held("tool-1.0") is None
    assert not gate.paused("tool-1.0")
    # The window closes on a running fetch: it pauses after the chunk in flight.
    clock.now = at("2026-12-03T06:00:00")
    assert gate.paused("tool-1.0")


async def test_the_jobs_windows_bind_too(tmp_path: Path) -> None:
    clock = FakeClock(at("2026-12-02T23:00:00"))
    paces = {"tool-1.0": [JobPace(0, (EARLY,))]}
    gate = TransferGate(
        config(tmp_path, transfer_windows=(NIGHT,)), lambda p: paces.get(p, []), clock=clock
    )
    assert gate.transfer_opens("tool-1.0", clock.now) == at("2026-12-03T05:00:00")
    assert gate.transfer_opens("other-1.0", clock.now) == clock.now
    assert gate.install_opens(JobPace(0, (EARLY,)), clock.now) == at("2026-12-03T05:00:00")
    assert gate.install_opens(JobPace(), clock.now) == clock.now


async def test_a_reload_releases_a_waiting_fetch(tmp_path: Path) -> None:
    clock = FakeClock(at("2026-12-02T12:00:00"))
    cfg = config(tmp_path, transfer_windows=(NIGHT,))
    gate = TransferGate(cfg, clock=clock)
    waiting = asyncio.create_task(gate.wait_transfer("tool-1.0"))
    await asyncio.sleep(0.01)
    assert gate.held("tool-1.0") is not None
    gate.update(replace(cfg, transfer_windows=()))
    async with asyncio.timeout(1):
        await waiting
    assert gate.held("tool-1.0") is None


async def test_the_rate_asked_of_the_parent(tmp_path: Path) -> None:
    rates = {"tool-1.0": 2e6}
    cfg = config(tmp_path, download_rate=5e6)
    gate = TransferGate(cfg, package_rate=lambda p: rates.get(p, 0.0))
    assert gate.rate("tool-1.0") == 2e6  # the job's rate is tighter
    assert gate.rate("other-1.0") == 5e6
    gate.update(replace(cfg, download_rate=0.0))
    assert gate.rate("other-1.0") == 0.0


async def test_a_one_shot_command_does_not_wait(tmp_path: Path) -> None:
    clock = FakeClock(at("2026-12-02T12:00:00"))
    gate = TransferGate(config(tmp_path, transfer_windows=(NIGHT,)), clock=clock, waits=False)
    with pytest.raises(WindowClosed, match="waiting for window 22:00"):
        await gate.wait_transfer("tool-1.0")


async def test_a_reload_of_the_rate_pauses_a_resuming_fetch_once(tmp_path: Path) -> None:
    cfg = config(tmp_path, download_rate=400_000.0)
    gate = TransferGate(cfg)
    resuming = gate.pause_check("tool-1.0", resumes=True)
    restarting = gate.pause_check("tool-1.0", resumes=False)
    assert not resuming() and not restarting()
    gate.update(replace(cfg, transfer_windows=()))  # the rate did not change
    assert not resuming()
    gate.update(replace(cfg, download_rate=4e6))
    assert resuming()  # ask again at the new rate, from the verified offset
    assert not restarting()  # a client under a relay would start over: it keeps on
