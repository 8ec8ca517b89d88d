"""Pacing package data: token buckets and the hierarchy a served fetch uses.

A ``TokenBucket`` holds up to ``burst`` bytes of credit and earns ``rate``
bytes of it per second; taking more than it holds leaves it in debt, and the
taker waits until the debt is paid. So a chunk larger than the burst still
goes (a burst of about one chunk), and over any longer span the bytes taken
never exceed ``burst + rate * seconds``. The arithmetic (``reserve``) reads
an injectable clock and does no I/O, so it is tested without waiting.

``take`` is served first come, first served (an asyncio lock wakes its
waiters in order), so children sharing one bucket (the node's upload total)
take turns chunk by chunk and share it evenly. A rate changed while someone
waits (a reload) applies at once: the waiter is woken and waits again for
what is left of its debt at the new rate.

Pacing happens before a chunk is handed to the session, never inside it:
the session's control frames (notices, reports, pongs) go out between paced
chunks without waiting for any bucket.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

__all__ = ["BURST", "Clock", "LinkPacing", "Pacer", "TokenBucket", "lowest_rate"]

log = structlog.get_logger("rdsd.pace")

Clock = Callable[[], float]
#: The credit a bucket starts with and may save up: about one chunk (the
#: default chunk size), so a paced transfer's first chunk goes at once.
BURST = 1024 * 1024


def lowest_rate(*rates: float) -> float:
    """The tightest of several limits in bytes per second; 0 means none, so
    zeros are ignored and all zeros give 0 (unlimited)."""
    set_ = [r for r in rates if r > 0]
    return min(set_) if set_ else 0.0


class TokenBucket:
    """``rate`` bytes per second (0: unlimited) with ``burst`` bytes of credit."""

    def __init__(self, rate: float, burst: int = BURST, clock: Clock = time.monotonic) -> None:
        if rate < 0 or burst <= 0:
            raise ValueError("a bucket needs a rate >= 0 and a burst > 0")
        self._rate = float(rate)
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def tokens(self) -> float:
        """Credit now (negative: debt still to wait out)."""
        self._refill()
        return self._tokens

    def _refill(self) -> None:
        now = self._clock()
        if self._rate == 0:
            self._tokens = float(self.burst)
        else:
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self._rate)
        self._at = now

    def wait_time(self) -> float:
        """Seconds until the debt is paid at the current rate (0 if none)."""
        self._refill()
        if self._tokens >= 0 or self._rate == 0:
            return 0.0
        return -self._tokens / self._rate

    def reserve(self, nbytes: int) -> float:
        """Take ``nbytes`` of credit now and return how long the taker must
        wait before sending them. Pure arithmetic on the clock."""
        self._refill()
        if self._rate == 0:
            return 0.0
        self._tokens -= nbytes
        return self.wait_time()

    def set_rate(self, rate: float) -> None:
        """Change the rate (a reload). Credit earned so far is kept at the old
        rate; a waiter is woken to wait out its debt at the new one."""
        if rate < 0:
            raise ValueError("rate must be >= 0")
        if rate == self._rate:
            return
        self._refill()
        self._rate = float(rate)
        self._refill()
        self._changed.set()
        self._changed = asyncio.Event()

    async def take(self, nbytes: int) -> None:
        """Wait until ``nbytes`` may be sent, in turn with other takers."""
        if self._rate == 0 and not self._lock.locked():
            return
        async with self._lock:
            wait = self.reserve(nbytes)
            while wait > 0:
                changed = self._changed
                try:
                    async with asyncio.timeout(wait):
                        await changed.wait()
                except TimeoutError:
                    pass
                wait = self.wait_time()


class Pacer:
    """The buckets one stream of chunks passes through, tightest scope first
    (this fetch, then its child, then the node's upload total). A chunk may
    go once every bucket has let it; waits overlap, so the slowest bucket
    sets the pace."""

    def __init__(self, *buckets: TokenBucket | None) -> None:
        self.buckets = [b for b in buckets if b is not None]

    @property
    def rate(self) -> float:
        """The tightest rate now in force (0: unlimited)."""
        return lowest_rate(*(b.rate for b in self.buckets))

    async def take(self, nbytes: int) -> None:
        for bucket in self.buckets:
            await bucket.take(nbytes)


@dataclass
class LinkPacing:
    """The sending side of a parent's limits, changeable while it runs.

    ``upload_rate`` caps all package data this node sends to its children
    together and ``per_child_rate`` what each child gets; a child may ask
    for less (its own ``download_rate``, carried in FETCH). A fetch for a
    job with a rate gets a bucket of its own at that rate."""

    upload_rate: float = 0.0
    per_child_rate: float = 0.0
    clock: Clock = time.monotonic
    _total: TokenBucket | None = None
    _children: dict[str, TokenBucket] = field(default_factory=dict)
    _asked: dict[str, float] = field(default_factory=dict)

    def _total_bucket(self) -> TokenBucket:
        if self._total is None:
            self._total = TokenBucket(self.upload_rate, clock=self.clock)
        return self._total

    def child_rate(self, child: str) -> float:
        """What one child's data is paced at: this node's per-child limit or
        the child's own download limit, whichever is tighter."""
        return lowest_rate(self.per_child_rate, self._asked.get(child, 0.0))

    def for_fetch(self, child: str, job_rate: float, asked: float) -> Pacer:
        """The pacer for one fetch by ``child``: ``job_rate`` is the tightest
        rate of the jobs the package is for, ``asked`` the child's own
        download limit (0: none)."""
        self._asked[child] = asked
        bucket = self._children.get(child)
        rate = self.child_rate(child)
        if bucket is None:
            bucket = self._children[child] = TokenBucket(rate, clock=self.clock)
        else:
            bucket.set_rate(rate)
        job = TokenBucket(job_rate, clock=self.clock) if job_rate > 0 else None
        return Pacer(job, bucket, self._total_bucket())

    def set_limits(self, upload_rate: float, per_child_rate: float) -> None:
        """New limits (a reload): fetches already running take them from
        their next chunk on."""
        self.upload_rate, self.per_child_rate = upload_rate, per_child_rate
        self._total_bucket().set_rate(upload_rate)
        for child, bucket in self._children.items():
            bucket.set_rate(self.child_rate(child))

    def forget(self, child: str) -> None:
        """A child's session ended: its bucket goes (it starts afresh)."""
        self._children.pop(child, None)
        self._asked.pop(child, None)
