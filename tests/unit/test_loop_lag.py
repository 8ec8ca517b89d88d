"""The event-loop lag monitor: figures, bounded memory, when it logs, and
one real measurement of a loop that is blocked on purpose."""

from __future__ import annotations

import asyncio
import time

import pytest
from structlog.testing import capture_logs

from rdsd.node.lag import RESERVOIR, LoopMonitor


class FakeTime:
    """A clock, a CPU clock and a sleep that advances the clock by the
    interval plus whatever lag the test scripted, without waiting."""

    def __init__(self, lags: list[float], cpu_per_wake: float = 0.0) -> None:
        self.now = 1000.0
        self.cpu_now = 5.0
        self.lags = list(lags)
        self.cpu_per_wake = cpu_per_wake

    def clock(self) -> float:
        return self.now

    def cpu(self) -> float:
        return self.cpu_now

    async def sleep(self, seconds: float) -> None:
        if not self.lags:
            raise asyncio.CancelledError  # the script is over: end run()
        self.now += seconds + self.lags.pop(0)
        self.cpu_now += self.cpu_per_wake
        await asyncio.sleep(0)


def monitor(ft: FakeTime, period: float = 1.0) -> LoopMonitor:
    return LoopMonitor("n1", period, 0.1, clock=ft.clock, cpu=ft.cpu, sleep=ft.sleep)


async def drive(mon: LoopMonitor) -> None:
    with pytest.raises(asyncio.CancelledError):
        await mon.run()


async def test_figures_of_a_period_and_the_event_when_lagging() -> None:
    # Ten wake-ups of 0.1 s make the 1 s period: nine on time-ish, one 0.5 s late.
    ft = FakeTime([0.001] * 9 + [0.5] + [0.0])
    mon = monitor(ft)
    with capture_logs() as logs:
        await drive(mon)
    assert mon.last is not None
    assert mon.last.samples == 10  # the late tenth wake-up ended the 1 s period
    events = [e for e in logs if e["event"] == "loop.lag"]
    assert len(events) == 1
    ev = events[0]
    assert ev["node"] == "n1"
    assert ev["max_ms"] == 500.0
    assert ev["p50_ms"] == 1.0
    assert ev["p99_ms"] == 500.0


async def test_an_idle_period_is_not_logged_but_kept() -> None:
    ft = FakeTime([0.0005] * 25)  # two and a half periods, no work, no lag
    mon = monitor(ft)
    with capture_logs() as logs:
        await drive(mon)
    assert not [e for e in logs if e["event"] == "loop.lag"]
    assert mon.last is not None and mon.last.max == pytest.approx(0.0005)
    current = mon.current()
    assert current is not None and current.samples == 5


async def test_a_busy_period_is_logged_even_without_lag() -> None:
    ft = FakeTime([0.0] * 11, cpu_per_wake=0.02)  # 20 % of a core
    mon = monitor(ft)
    with capture_logs() as logs:
        await drive(mon)
    events = [e for e in logs if e["event"] == "loop.lag"]
    assert len(events) == 1
    assert events[0]["max_ms"] == 0.0
    assert events[0]["cpu_s"] == pytest.approx(0.2)
    assert mon.last is not None and mon.last.busy == pytest.approx(0.2)


def test_memory_is_bounded_and_max_exact() -> None:
    ft = FakeTime([])
    mon = monitor(ft, period=1e9)
    for i in range(10 * RESERVOIR):
        mon.record(i / 1e6)
    mon.record(3.0)
    assert len(mon._samples) == RESERVOIR
    figures = mon.current()
    assert figures is not None
    assert figures.samples == 10 * RESERVOIR + 1
    assert figures.max == 3.0
    # A uniform sample of 0..10 ms: its median is near 5 ms.
    assert 0.003 < figures.p50 < 0.007


async def test_real_loop_blocked_shows_as_lag() -> None:
    """A real monitor on the running loop: a callback that blocks the loop
    for 300 ms shows up as about that much lag."""
    mon = LoopMonitor("real", period=60.0, interval=0.02)
    task = asyncio.create_task(mon.run())
    await asyncio.sleep(0.1)
    # A callback that blocks the loop, as a long synchronous call would.
    asyncio.get_running_loop().call_soon(time.sleep, 0.3)
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    figures = mon.current()
    assert figures is not None
    assert 0.2 <= figures.max < 2.0
    assert figures.p50 < 0.1
