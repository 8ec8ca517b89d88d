"""How late the node's own event loop runs, measured from inside.

A task sleeps a fixed interval and records how much later than asked it
woke: on a loop that is busy (a long callback, a blocking call, a flood of
work) that lateness is what every other callback waits too, so it is the
latency the node adds to every message it handles. A probe from outside
(a PING timed to its PONG) measures the same plus its own process's stalls;
this monitor measures the daemon alone.

Memory is bounded whatever the period: each period keeps at most
``RESERVOIR`` samples (a uniform reservoir once full; the maximum and the
count stay exact). At the end of a period the figures are kept for
embedders (``LoopMonitor.last``, ``Node.loop_lag``) and logged as one
``loop.lag`` event, but only when the period had work (the process used at
least ``BUSY`` of a core) or lag at or over ``THRESHOLD``: an idle node's
log stays quiet.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

#: How often the monitor wakes; its lateness is the sample.
INTERVAL = 0.1
#: Samples kept per period at most (8 KiB); beyond it, a uniform reservoir.
RESERVOIR = 1024
#: A period whose worst lag reaches this is logged even if the node was idle.
THRESHOLD = 0.1
#: A period in which the process used at least this share of one core is
#: logged: the node was doing work, so its lag is worth a line.
BUSY = 0.05


@dataclass(frozen=True, slots=True)
class LagFigures:
    """Event-loop lag over one period: percentiles and worst in seconds,
    how many wake-ups were measured, how long the period was, and the CPU
    seconds the process used in it (all threads)."""

    p50: float
    p99: float
    max: float
    samples: int
    period: float
    cpu: float

    @property
    def busy(self) -> float:
        """The share of one core the process used over the period."""
        return self.cpu / self.period if self.period > 0 else 0.0


def _pct(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class LoopMonitor:
    """Measures the running loop's lag; ``run()`` is the task (the node
    runs it in its task group for as long as it runs).

    ``clock`` (monotonic seconds), ``cpu`` (the process's CPU seconds) and
    ``sleep`` are injectable so tests can drive it without waiting."""

    def __init__(
        self,
        node: str,
        period: float = 10.0,
        interval: float = INTERVAL,
        threshold: float = THRESHOLD,
        busy: float = BUSY,
        *,
        clock: Callable[[], float] = time.monotonic,
        cpu: Callable[[], float] = time.process_time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.period = period
        self.interval = interval
        self.threshold = threshold
        self.busy = busy
        self._clock = clock
        self._cpu = cpu
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.log = structlog.get_logger("rdsd.loop").bind(node=node)
        #: The last complete period's figures (None until one ends).
        self.last: LagFigures | None = None
        self._samples: list[float] = []
        self._seen = 0
        self._max = 0.0
        self._start = clock()
        self._cpu0 = cpu()

    def record(self, lag: float) -> None:
        """One wake-up ``lag`` seconds late."""
        self._seen += 1
        self._max = max(self._max, lag)
        if len(self._samples) < RESERVOIR:
            self._samples.append(lag)
        else:
            k = self._rng.randrange(self._seen)
            if k < RESERVOIR:
                self._samples[k] = lag

    def current(self) -> LagFigures | None:
        """The figures of the period in progress so far (None before the
        first sample)."""
        if not self._samples:
            return None
        ordered = sorted(self._samples)
        return LagFigures(
            p50=_pct(ordered, 0.5),
            p99=_pct(ordered, 0.99),
            max=self._max,
            samples=self._seen,
            period=self._clock() - self._start,
            cpu=self._cpu() - self._cpu0,
        )

    def close_period(self) -> LagFigures | None:
        """End the period: keep its figures, log them if it was busy or
        late, and start the next."""
        figures = self.current()
        self._samples = []
        self._seen = 0
        self._max = 0.0
        self._start = self._clock()
        self._cpu0 = self._cpu()
        if figures is None:
            return None
        self.last = figures
        if figures.max >= self.threshold or figures.busy >= self.busy:
            self.log.info(
                "loop.lag",
                p50_ms=round(1000 * figures.p50, 1),
                p99_ms=round(1000 * figures.p99, 1),
                max_ms=round(1000 * figures.max, 1),
                samples=figures.samples,
                period_s=round(figures.period, 2),
                cpu_s=round(figures.cpu, 2),
            )
        return figures

    async def run(self) -> None:
        """Sleep ``interval``, record how late the wake-up was, and close a
        period every ``period`` seconds; until cancelled."""
        self._start, self._cpu0 = self._clock(), self._cpu()  # the node starts now
        while True:
            asked = self._clock()
            await self._sleep(self.interval)
            woke = self._clock()
            self.record(max(0.0, woke - asked - self.interval))
            if woke - self._start >= self.period:
                self.close_period()
