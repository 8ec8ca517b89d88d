"""Sharing the event loop's turns among bursts of work.

One turn of an asyncio loop runs every callback that was ready when it
began, and no timer fires until the turn is over. When a thousand children
send a report in the same moment, a thousand readers are ready in the same
turn; each checking a signature (about 0.3 ms) makes that one turn take a
third of a second, and every PING, every chunk and every timer of the node
waits for it. That was the loop lag a relay showed under a fleet's job.

``await take_turn()`` before a unit of work (handling one message, sending
one chunk) lets the work go on while the current slice of this turn has
used less than ``SLICE``; past that, the caller waits for a later turn (and
so does every later caller, in arrival order), where as many go on as the
slice is expected to hold. Timers and I/O get a look-in between slices, so
a burst costs many short turns instead of one long one; total work is
unchanged. Cheap messages that keep a link alive (PING) do not queue here.
The budget belongs to the running loop: nodes sharing a loop share its
turns.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

#: Work one turn may do through ``take_turn`` before the rest waits a turn.
SLICE = 0.01


class Turns:
    """The budget of one event loop (``take_turn`` finds the running loop's).

    Callers past the slice wait in arrival order on a future each (no
    spinning); once per turn, while any wait, the budget lets through as
    many as it expects the slice to hold, from what the last batch cost."""

    def __init__(self, slice_: float = SLICE, clock: Callable[[], float] = time.monotonic) -> None:
        self.slice = slice_
        self._clock = clock
        self._start: float | None = None
        self._waiters: deque[tuple[asyncio.Future[None], asyncio.Task[Any] | None]] = deque()
        # Tasks let through in this turn: they may go on while the slice lasts.
        self._holders: set[asyncio.Task[Any]] = set()
        self._scheduled = False
        self._unit = slice_  # what one unit of work costs, as measured
        self._released = 0
        self._released_at = 0.0
        #: How many times a caller waited for a later turn (for tests and benches).
        self.deferred = 0

    async def take(self) -> None:
        """Return at once while this turn's slice lasts and nobody waits;
        else wait, first come first served, for a later turn."""
        now = self._clock()
        if self._start is None:
            # The first caller of a turn starts its slice; the next turn
            # starts another.
            self._start = now
            self._schedule()
        if now - self._start < self.slice and (
            not self._waiters or asyncio.current_task() in self._holders
        ):
            # Within the slice: anyone while nobody waits; else only those
            # let through this turn (a reader with a burst of messages goes
            # on with them instead of one message per turn).
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((waiter, asyncio.current_task()))
        self.deferred += 1
        self._schedule()
        await waiter

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._turn)

    def _turn(self) -> None:
        """Once per turn: measure the last batch, let the next one through."""
        self._scheduled = False
        now = self._clock()
        if self._released:
            cost = (now - self._released_at) / self._released
            self._unit = (self._unit + cost) / 2
            self._released = 0
        self._holders.clear()
        while self._waiters and self._waiters[0][0].done():  # cancelled meanwhile
            self._waiters.popleft()
        if not self._waiters:
            self._start = None
            return
        n = max(1, int(self.slice / max(self._unit, 1e-6)))
        while n and self._waiters:
            waiter, task = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                if task is not None:
                    self._holders.add(task)
                self._released += 1
                n -= 1
        self._released_at = now
        # This turn's slice is the batch's: callers arriving now wait.
        self._start = now
        self._schedule()


_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Turns] = weakref.WeakKeyDictionary()


def turns() -> Turns:
    """The running loop's budget."""
    loop = asyncio.get_running_loop()
    budget = _by_loop.get(loop)
    if budget is None:
        budget = _by_loop[loop] = Turns()
    return budget


async def take_turn() -> None:
    """``turns().take()``: before a unit of work that may come in bursts."""
    await turns().take()
