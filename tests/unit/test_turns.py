"""Sharing the loop's turns: a burst of work is spread over many short
turns, so timers and other tasks are not held up for the whole burst."""

from __future__ import annotations

import asyncio
import time

from rdsd.node.lag import LoopMonitor
from rdsd.util.turns import Turns, take_turn, turns


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_a_burst_is_spread_over_turns() -> None:
    """Ten units of 4 ms with a 10 ms slice: at most three run per turn
    (the third starts inside the slice), every one runs, in order."""
    clock = Clock()
    budget = Turns(0.01, clock)
    order: list[object] = []

    async def unit(i: int) -> None:
        await budget.take()
        clock.now += 0.004
        order.append(i)

    async def ticker() -> None:
        while len([x for x in order if x != "turn"]) < 10:
            order.append("turn")
            await asyncio.sleep(0)

    await asyncio.gather(ticker(), *(unit(i) for i in range(10)))
    units = [x for x in order if x != "turn"]
    assert units == list(range(10))
    runs = [len(part) for part in _split(order)]
    assert max(runs) <= 3
    assert budget.deferred > 0


def _split(order: list[object]) -> list[list[object]]:
    parts: list[list[object]] = [[]]
    for x in order:
        if x == "turn":
            parts.append([])
        else:
            parts[-1].append(x)
    return parts


async def test_no_wait_while_the_slice_lasts() -> None:
    clock = Clock()
    budget = Turns(0.01, clock)
    for _ in range(100):
        await budget.take()  # no time passes: never deferred
    assert budget.deferred == 0


async def test_one_budget_per_loop() -> None:
    assert turns() is turns()


def _work() -> None:
    time.sleep(0.001)  # a millisecond of synchronous work, as a signature check


async def _burst_lag(take_turns: bool) -> float:
    """The loop monitor's worst lag while 400 readers, ready at once, each
    do 1 ms of synchronous work (with or without taking turns)."""
    mon = LoopMonitor("t", period=60.0, interval=0.005)
    watching = asyncio.create_task(mon.run())
    await asyncio.sleep(0.05)

    async def reader() -> None:
        if take_turns:
            await take_turn()
        _work()

    await asyncio.gather(*(reader() for _ in range(400)))
    await asyncio.sleep(0.02)
    watching.cancel()
    figures = mon.current()
    assert figures is not None
    return figures.max


async def test_a_real_burst_does_not_hold_the_loop() -> None:
    """Without taking turns the burst is one turn of at least 400 ms (the
    work sleeps in wall time), and the monitor sees that much lag; taking
    turns, the loop gets back to its timers many times within it. Judged
    against the burst without turns in the same run, so a loaded machine
    slows both sides alike."""
    held = await _burst_lag(take_turns=False)
    shared = await _burst_lag(take_turns=True)
    assert held >= 0.4, held
    assert shared < held / 2, (shared, held)


async def test_a_waiter_cancelled_does_not_hold_up_the_next() -> None:
    clock = Clock()
    budget = Turns(0.01, clock)

    async def spend() -> None:
        await budget.take()
        clock.now += 0.02  # the slice is spent: the next callers of this turn wait

    spender = asyncio.create_task(spend())
    first = asyncio.create_task(budget.take())
    second = asyncio.create_task(budget.take())
    await asyncio.sleep(0)  # all three have run their first step
    await spender
    first.cancel()
    async with asyncio.timeout(5):
        await second
    assert first.cancelled()
    assert budget.deferred == 2


async def test_a_reader_let_through_goes_on_with_its_burst() -> None:
    """One reader with five queued messages of 1 ms each: once let through
    it handles them all in its slice, not one per turn, while a reader
    behind it keeps its place in the queue."""
    clock = Clock()
    budget = Turns(0.01, clock)
    done: list[str] = []

    async def spend() -> None:
        await budget.take()
        clock.now += 0.02

    async def reader(name: str, messages: int) -> None:
        for _ in range(messages):
            await budget.take()
            clock.now += 0.001
            done.append(name)

    async with asyncio.timeout(5):
        await asyncio.gather(spend(), reader("a", 5), reader("b", 1))
    assert done == ["a"] * 5 + ["b"]
