"""Sharing the event loop's turns among bursts of work.

One turn of an asyncio loop runs every callback that was ready when it
began, and no timer fires until the turn is over. When a thousand children
send a report in the same moment, a thousand readers are ready in the same
turn; each checking a signature (about 0.3 ms) makes that one turn take a
third of a second, and every PING, every chunk and every timer of the node
waits for it. That was the loop lag a relay showed under a fleet's job.

``await take_turn()`` before a unit of work (handling one message, sending
one chunk) lets the work go on while the current slice of this turn has
used less than ``SLICE``; past that, the caller waits for the next turn (and
so does every other caller of this turn), where a fresh slice begins.
Timers and I/O get a look-in between slices, so a burst costs many short
turns instead of one long one; total work is unchanged. The budget belongs
to the running loop: nodes sharing a loop share its turns.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable

#: Work one turn may do through ``take_turn`` before the rest waits a turn.
SLICE = 0.01


class Turns:
    """The budget of one event loop (``take_turn`` finds the running loop's)."""

    def __init__(self, slice_: float = SLICE, clock: Callable[[], float] = time.monotonic) -> None:
        self.slice = slice_
        self._clock = clock
        self._start: float | None = None
        #: How many times a caller waited for a later turn (for tests and benches).
        self.deferred = 0

    async def take(self) -> None:
        """Return at once while this turn's slice lasts; else wait for a
        later turn with slice left."""
        while True:
            now = self._clock()
            if self._start is None:
                # The first caller of a turn starts its slice, and ends it at
                # the next turn: scheduled now, the reset runs there before
                # the callers that wait below.
                self._start = now
                asyncio.get_running_loop().call_soon(self._reset)
            if now - self._start < self.slice:
                return
            self.deferred += 1
            await asyncio.sleep(0)

    def _reset(self) -> None:
        self._start = None


_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Turns] = (
    weakref.WeakKeyDictionary()
)


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
