"""The token bucket and the limits a parent paces its children with.

The arithmetic is checked on a fake clock (``reserve`` never waits); the
waiting (``take``) on the real event loop with rates high enough that each
test takes a fraction of a second."""

from __future__ import annotations

import asyncio
import time

import pytest

from rdsd.net.pace import BURST, LinkPacing, Pacer, TokenBucket, lowest_rate

MB = 1_000_000
CHUNK = 64 * 1024


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_first_chunk_goes_at_once_then_the_rate_holds() -> None:
    clock = FakeClock()
    bucket = TokenBucket(MB, burst=BURST, clock=clock)
    assert bucket.reserve(BURST) == 0.0  # the burst: about one chunk
    assert bucket.reserve(MB) == pytest.approx(1.0)
    clock.now += 1.0
    assert bucket.wait_time() == pytest.approx(0.0)


def test_a_chunk_larger_than_the_burst_still_goes() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, burst=100, clock=clock)
    assert bucket.reserve(1100) == pytest.approx(1.0)  # debt, not refusal


@pytest.mark.parametrize("rate", [1000.0, 1 * MB, 12.5 * MB])
def test_never_more_than_burst_plus_rate_times_time(rate: float) -> None:
    """A sender that sends each chunk when the bucket says so: over any
    span, at most burst + rate * span, and it keeps up with the rate."""
    clock = FakeClock()
    bucket = TokenBucket(rate, burst=BURST, clock=clock)
    start, sent = clock.now, 0
    for _ in range(500):
        clock.now += bucket.reserve(CHUNK)
        sent += CHUNK
        elapsed = clock.now - start
        assert sent <= BURST + rate * elapsed + 1e-6
    assert sent >= rate * (clock.now - start)


def test_credit_saved_up_is_capped_at_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, burst=500, clock=clock)
    clock.now += 3600
    assert bucket.tokens == 500
    assert bucket.reserve(1500) == pytest.approx(1.0)


def test_unlimited_never_waits() -> None:
    bucket = TokenBucket(0, clock=FakeClock())
    assert all(bucket.reserve(10 * BURST) == 0.0 for _ in range(100))


def test_a_new_rate_applies_to_the_debt_left() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, burst=100, clock=clock)
    bucket.reserve(100 + 2000)  # 2 s of debt at 1000 B/s
    clock.now += 1.0  # 1000 of it paid
    bucket.set_rate(10_000)
    assert bucket.wait_time() == pytest.approx(0.1)
    bucket.set_rate(0)
    assert bucket.wait_time() == 0.0


def test_bad_buckets_are_refused() -> None:
    with pytest.raises(ValueError):
        TokenBucket(-1)
    with pytest.raises(ValueError):
        TokenBucket(1, burst=0)
    with pytest.raises(ValueError):
        TokenBucket(1).set_rate(-5)


def test_lowest_rate_ignores_unlimited() -> None:
    assert lowest_rate() == 0.0
    assert lowest_rate(0, 0) == 0.0
    assert lowest_rate(0, 5.0, 3.0) == 3.0


async def test_takers_share_a_bucket_in_turn() -> None:
    """Three streams through one bucket alternate chunk by chunk (the lock
    is first come, first served), so each gets a third."""
    bucket = TokenBucket(20 * MB, burst=CHUNK)
    order: list[int] = []

    async def stream(n: int) -> None:
        for _ in range(8):
            await bucket.take(CHUNK)
            order.append(n)

    async with asyncio.timeout(5):
        await asyncio.gather(*(stream(n) for n in range(3)))
    # At every point no stream is more than a chunk or two ahead of another
    # (the first may take its burst before the others start).
    for k in range(1, len(order)):
        counts = [order[:k].count(n) for n in range(3)]
        assert max(counts) - min(counts) <= 2, order


async def test_take_paces_in_real_time() -> None:
    bucket = TokenBucket(4 * MB, burst=CHUNK)
    start = time.monotonic()
    async with asyncio.timeout(5):
        for _ in range(1 + 32):
            await bucket.take(CHUNK)
    elapsed = time.monotonic() - start
    assert elapsed == pytest.approx(32 * CHUNK / (4 * MB), rel=0.15)


async def test_a_reload_wakes_a_waiter() -> None:
    """A waiter with minutes of debt at the old rate goes at once when the
    rate is lifted."""
    bucket = TokenBucket(1000, burst=100)
    await bucket.take(100)
    waiter = asyncio.create_task(bucket.take(200_000))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    bucket.set_rate(0)
    async with asyncio.timeout(1):
        await waiter


async def test_pacer_waits_for_its_slowest_bucket() -> None:
    fast, slow = TokenBucket(100 * MB, burst=CHUNK), TokenBucket(4 * MB, burst=CHUNK)
    pacer = Pacer(None, fast, slow)
    assert pacer.rate == 4 * MB
    start = time.monotonic()
    async with asyncio.timeout(5):
        for _ in range(1 + 16):
            await pacer.take(CHUNK)
    assert time.monotonic() - start == pytest.approx(16 * CHUNK / (4 * MB), rel=0.15)


def test_link_pacing_takes_the_tightest_limit_per_child() -> None:
    pacing = LinkPacing(upload_rate=10 * MB, per_child_rate=2 * MB)
    a = pacing.for_fetch("a", job_rate=0.0, asked=0.0)
    assert [b.rate for b in a.buckets] == [2 * MB, 10 * MB]
    b = pacing.for_fetch("b", job_rate=MB, asked=0.5 * MB)
    assert [x.rate for x in b.buckets] == [MB, 0.5 * MB, 10 * MB]
    assert b.rate == 0.5 * MB
    # One child bucket per child, one upload bucket for all.
    assert a.buckets[-1] is b.buckets[-1]
    assert pacing.for_fetch("a", 0.0, 0.0).buckets[0] is a.buckets[0]
    pacing.set_limits(upload_rate=0.0, per_child_rate=3 * MB)
    assert a.buckets[0].rate == 3 * MB and a.buckets[-1].rate == 0.0
    assert b.buckets[1].rate == 0.5 * MB  # b asked for less itself
    pacing.forget("b")
    assert pacing.for_fetch("b", 0.0, 0.0).buckets[0].rate == 3 * MB
