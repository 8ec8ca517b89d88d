"""The event stream embedders follow: per-subscriber order, filters, the
slow-consumer policy, closing, and waiting for a destination state without
polling."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import time

import pytest

from rdsd.domain import DestState, HelloPurpose, JobType, Role
from rdsd.events import (
    ChildConnected,
    ChildDisconnected,
    DestChanged,
    Event,
    EventBus,
    EventBusClosed,
    EventsDropped,
    JobReceived,
    PackageExpired,
    PackageStored,
    Subscription,
    TransferProgress,
    wait_for_state,
)

BOUND = 2.0  # no single wait in these tests may take longer than this


def dest(
    job: str = "j1",
    node: str = "c1",
    new: DestState = DestState.TRANSFERRING,
    *,
    source: str = "relay",
    detail: str = "",
) -> DestChanged:
    return DestChanged(
        source=source, job=job, node=node, package="pkg", old=None, new=new, detail=detail
    )


async def take(sub: Subscription, n: int) -> list[Event]:
    """Read exactly ``n`` events, within ``BOUND`` seconds."""
    out: list[Event] = []
    async with asyncio.timeout(BOUND):
        while len(out) < n:
            out.append(await anext(sub))
    return out


async def drain(sub: Subscription) -> list[Event]:
    """Everything until iteration ends, within ``BOUND`` seconds."""
    async with asyncio.timeout(BOUND):
        return [event async for event in sub]


def one_of_each(source: str = "relay") -> list[Event]:
    return [
        JobReceived(
            source=source, job="j1", job_type=JobType.INSTALL, package="pkg", destinations=("c1",)
        ),
        dest("j1", "c1", source=source),
        TransferProgress(
            source=source, job="j1", node="c1", package="pkg", done=10, total=100, rate=5.0
        ),
        ChildConnected(source=source, child="c2", role=Role.CLIENT, purpose=HelloPurpose.SESSION),
        ChildDisconnected(source=source, child="c2", reason="closed"),
        PackageStored(source=source, package="pkg", size=100, expires=1e10),
        PackageExpired(source=source, package="pkg"),
    ]


def test_events_are_frozen_and_timestamped() -> None:
    before = time.time()
    event = PackageExpired(source="relay", package="pkg")
    assert before <= event.time <= time.time()
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.package = "other"  # type: ignore[misc]
    assert not hasattr(event, "__dict__")


async def test_order_preserved_per_subscriber() -> None:
    bus = EventBus("relay")
    sub = bus.subscribe(maxsize=10_000)
    sent = [dest(detail=str(i)) for i in range(5000)]
    for event in sent:
        bus.publish(event)
    assert await take(sub, len(sent)) == sent
    assert sub.dropped == 0


async def test_order_preserved_while_reading_concurrently() -> None:
    bus = EventBus("relay")
    sub = bus.subscribe()
    sent = [dest(detail=str(i)) for i in range(3000)]

    async def producer() -> None:
        for i, event in enumerate(sent):
            bus.publish(event)
            if i % 50 == 0:
                await asyncio.sleep(0)

    task = asyncio.create_task(producer())
    got = await take(sub, len(sent))
    await task
    assert got == sent


async def test_filter_by_job() -> None:
    bus = EventBus("relay")
    one = bus.subscribe(job="j1")
    many = bus.subscribe(job=["j1", "j2"])
    other_job = dest("j2", "c1")
    events = [*one_of_each(), other_job, dest("j3", "c1")]
    no_job = TransferProgress(
        source="relay", job=None, node="c1", package="pkg", done=1, total=2, rate=1.0
    )
    for event in [*events, no_job]:
        bus.publish(event)
    bus.close()
    with_j1 = [e for e in events if getattr(e, "job", None) == "j1"]
    assert len(with_j1) == 3  # events without a job attribute never match
    assert await drain(one) == with_j1
    assert await drain(many) == [*with_j1, other_job]


async def test_filter_by_node_matches_node_child_and_source() -> None:
    bus = EventBus("relay")
    by_dest = bus.subscribe(node="c1")
    by_child = bus.subscribe(node="c2")
    by_source = bus.subscribe(node="other-relay")
    by_several = bus.subscribe(node={"c1", "c2"})
    events = one_of_each()
    foreign = PackageStored(source="other-relay", package="pkg", size=1, expires=0.0)
    for event in [*events, foreign]:
        bus.publish(event)
    bus.close()
    assert await drain(by_dest) == events[1:3]  # DestChanged, TransferProgress: node == c1
    assert await drain(by_child) == events[3:5]  # ChildConnected, ChildDisconnected
    assert await drain(by_source) == [foreign]
    assert await drain(by_several) == events[1:5]


async def test_filter_by_own_name_yields_everything_emitted() -> None:
    bus = EventBus("relay")
    sub = bus.subscribe(node="relay")
    events = one_of_each()
    for event in events:
        bus.publish(event)
    bus.close()
    assert await drain(sub) == events


async def test_filter_by_type() -> None:
    bus = EventBus("relay")
    single = bus.subscribe(types=DestChanged)
    several = bus.subscribe(types=[ChildConnected, ChildDisconnected])
    base = bus.subscribe(types=Event)
    events = one_of_each()
    for event in events:
        bus.publish(event)
    bus.close()
    assert await drain(single) == [events[1]]
    assert await drain(several) == events[3:5]
    assert await drain(base) == events


async def test_filters_combine() -> None:
    bus = EventBus("relay")
    sub = bus.subscribe(job="j1", node="c1", types=DestChanged)
    wanted = dest("j1", "c1", DestState.INSTALLED)
    for event in [
        dest("j2", "c1"),  # wrong job
        dest("j1", "c9"),  # wrong node
        TransferProgress(
            source="relay", job="j1", node="c1", package="pkg", done=1, total=2, rate=1.0
        ),  # wrong type
        wanted,
    ]:
        bus.publish(event)
    bus.close()
    assert await drain(sub) == [wanted]


async def test_empty_filter_matches_nothing() -> None:
    bus = EventBus("relay")
    sub = bus.subscribe(job=[])
    for event in one_of_each():
        bus.publish(event)
    bus.close()
    assert await drain(sub) == []


def test_bad_subscribe_arguments_are_refused() -> None:
    bus = EventBus("relay")
    with pytest.raises(ValueError):
        bus.subscribe(maxsize=0)
    with pytest.raises(TypeError):
        bus.subscribe(types=[int])  # type: ignore[list-item]


async def test_slow_consumer_keeps_maxsize_and_reports_drops_first() -> None:
    bus = EventBus("relay")
    maxsize, extra = 50, 17
    sub = bus.subscribe(maxsize=maxsize)
    sent = [dest(detail=str(i)) for i in range(maxsize + extra)]
    for event in sent:
        bus.publish(event)
    assert sub.pending == maxsize
    assert sub.dropped == extra
    first, *kept = await take(sub, 1 + maxsize)
    assert isinstance(first, EventsDropped)
    assert first.count == extra
    assert first.source == "relay"
    assert kept == sent[:maxsize]  # the newest were dropped, the kept come in order
    assert sub.pending == 0


async def test_drop_marker_counts_only_since_last_read() -> None:
    bus = EventBus("relay")
    sub = bus.subscribe(maxsize=3)
    for i in range(5):
        bus.publish(dest(detail=str(i)))
    marker, *_ = await take(sub, 4)
    assert marker == EventsDropped(source="relay", count=2, time=marker.time)
    for i in range(4):
        bus.publish(dest(detail=f"again {i}"))
    marker, *kept = await take(sub, 4)
    assert isinstance(marker, EventsDropped)
    assert marker.count == 1
    assert [e.detail for e in kept if isinstance(e, DestChanged)] == [
        "again 0",
        "again 1",
        "again 2",
    ]
    assert sub.dropped == 3  # the running total


async def test_drop_marker_is_delivered_whatever_the_type_filter() -> None:
    bus = EventBus("relay")
    sub = bus.subscribe(types=DestChanged, maxsize=1)
    bus.publish(dest())
    bus.publish(dest())
    first, _ = await take(sub, 2)
    assert isinstance(first, EventsDropped)


def test_publish_never_blocks_and_memory_stays_bounded() -> None:
    # publish is a plain function; it is called here with no loop and no reader.
    bus = EventBus("relay")
    maxsize, total = 1000, 100_000
    sub = bus.subscribe(maxsize=maxsize)
    highest = 0
    start = time.monotonic()
    for i in range(total):
        bus.publish(dest(detail=str(i)))
        highest = max(highest, sub.pending)
    assert time.monotonic() - start < 30
    assert highest == maxsize
    assert sub.dropped == total - maxsize


async def test_close_ends_iteration_and_is_idempotent() -> None:
    bus = EventBus("relay")
    sub = bus.subscribe()
    reader = asyncio.create_task(drain(sub))
    await asyncio.sleep(0)  # let the reader start waiting
    sub.close()
    sub.close()
    assert await asyncio.wait_for(reader, BOUND) == []
    assert sub.closed
    bus.publish(dest())
    assert sub.pending == 0
    assert bus.subscribers == 0


async def test_close_discards_what_is_buffered() -> None:
    bus = EventBus("relay")
    sub = bus.subscribe(maxsize=1)
    bus.publish(dest())
    bus.publish(dest())
    sub.close()
    assert await drain(sub) == []


async def test_async_with_unsubscribes() -> None:
    bus = EventBus("relay")
    async with bus.subscribe() as sub:
        assert bus.subscribers == 1
        event = dest()
        bus.publish(event)
        assert await take(sub, 1) == [event]
    assert sub.closed
    assert bus.subscribers == 0


async def test_abandoned_subscription_is_forgotten() -> None:
    bus = EventBus("relay")
    sub = bus.subscribe()
    assert bus.subscribers == 1
    del sub
    gc.collect()
    assert bus.subscribers == 0
    bus.publish(dest())  # nothing left to deliver to, and nothing breaks


async def test_bus_close_ends_every_subscription_after_buffered_events() -> None:
    bus = EventBus("relay")
    subs = [bus.subscribe() for _ in range(3)]
    readers = [asyncio.create_task(drain(sub)) for sub in subs]
    await asyncio.sleep(0)
    event = dest()
    bus.publish(event)
    bus.close()
    bus.close()
    results = await asyncio.wait_for(asyncio.gather(*readers), BOUND)
    assert results == [[event]] * 3
    assert bus.closed
    assert bus.subscribers == 0
    late = bus.subscribe()
    bus.publish(dest())
    assert await drain(late) == []


async def test_multiple_subscribers_each_get_everything() -> None:
    bus = EventBus("relay")
    subs = [bus.subscribe() for _ in range(4)]
    sent = one_of_each() * 20
    for event in sent:
        bus.publish(event)
    for sub in subs:
        assert await take(sub, len(sent)) == sent


# -- wait_for_state ----------------------------------------------------------------


class FakeDb:
    """The node's database as ``wait_for_state`` sees it: one state, and a
    signal that it was read (which happens only after subscribing)."""

    def __init__(self, state: DestState | None) -> None:
        self.state = state
        self.reads = 0
        self.read = asyncio.Event()

    def current(self) -> DestState | None:
        self.reads += 1
        self.read.set()
        return self.state


async def test_wait_returns_at_once_when_already_there() -> None:
    bus = EventBus("relay")
    db = FakeDb(DestState.INSTALLED)
    async with asyncio.timeout(BOUND):
        state = await wait_for_state(
            bus, "j1", "c1", {DestState.INSTALLED, DestState.FAILED}, db.current, 10
        )
    assert state is DestState.INSTALLED
    assert db.reads == 1
    assert bus.subscribers == 0


async def test_wait_accepts_a_single_state() -> None:
    bus = EventBus("relay")
    db = FakeDb(DestState.FAILED)
    async with asyncio.timeout(BOUND):
        assert await wait_for_state(bus, "j1", "c1", DestState.FAILED, db.current, 10) == "failed"


async def test_wait_returns_on_a_later_event() -> None:
    bus = EventBus("relay")
    db = FakeDb(None)
    waiter = asyncio.create_task(
        wait_for_state(bus, "j1", "c1", {DestState.INSTALLED}, db.current, 10)
    )
    await asyncio.wait_for(db.read.wait(), BOUND)
    bus.publish(dest("j1", "c1", DestState.TRANSFERRING))
    bus.publish(dest("j2", "c1", DestState.INSTALLED))  # another job
    bus.publish(dest("j1", "c9", DestState.INSTALLED))  # another destination
    bus.publish(dest("j1", "other", DestState.INSTALLED, source="c1"))  # source c1, node other
    await asyncio.sleep(0)
    assert not waiter.done()
    bus.publish(dest("j1", "c1", DestState.INSTALLED))
    assert await asyncio.wait_for(waiter, BOUND) is DestState.INSTALLED
    assert db.reads == 1  # events alone, no re-reading
    assert bus.subscribers == 0


async def test_wait_rechecks_after_drops() -> None:
    bus = EventBus("relay")
    db = FakeDb(DestState.WAITING)
    waiter = asyncio.create_task(
        wait_for_state(bus, "j1", "c1", {DestState.INSTALLED}, db.current, 10)
    )
    await asyncio.wait_for(db.read.wait(), BOUND)
    # Overflow the waiter's buffer before it runs; the decisive change is never seen.
    for i in range(5000):
        bus.publish(dest("j1", "c1", DestState.TRANSFERRING, detail=str(i)))
    db.state = DestState.INSTALLED
    assert await asyncio.wait_for(waiter, BOUND) is DestState.INSTALLED
    assert db.reads == 2


async def test_wait_times_out_within_the_bound() -> None:
    bus = EventBus("relay")
    db = FakeDb(DestState.WAITING)
    start = time.monotonic()
    async with asyncio.timeout(BOUND):
        with pytest.raises(TimeoutError):
            await wait_for_state(bus, "j1", "c1", {DestState.INSTALLED}, db.current, 0.2)
    elapsed = time.monotonic() - start
    assert 0.15 <= elapsed < 1.0
    assert bus.subscribers == 0


async def test_wait_raises_when_the_bus_closes() -> None:
    bus = EventBus("relay")
    db = FakeDb(DestState.WAITING)
    waiter = asyncio.create_task(
        wait_for_state(bus, "j1", "c1", {DestState.INSTALLED}, db.current, 10)
    )
    await asyncio.wait_for(db.read.wait(), BOUND)
    bus.close()
    with pytest.raises(EventBusClosed):
        await asyncio.wait_for(waiter, BOUND)


async def test_wait_returns_state_recorded_just_before_the_bus_closed() -> None:
    bus = EventBus("relay")
    db = FakeDb(DestState.WAITING)
    waiter = asyncio.create_task(
        wait_for_state(bus, "j1", "c1", {DestState.INSTALLED}, db.current, 10)
    )
    await asyncio.wait_for(db.read.wait(), BOUND)
    db.state = DestState.INSTALLED
    bus.close()
    assert await asyncio.wait_for(waiter, BOUND) is DestState.INSTALLED


async def test_wait_propagates_cancellation_and_unsubscribes() -> None:
    bus = EventBus("relay")
    db = FakeDb(DestState.WAITING)
    waiter = asyncio.create_task(
        wait_for_state(bus, "j1", "c1", {DestState.INSTALLED}, db.current, None)
    )
    await asyncio.wait_for(db.read.wait(), BOUND)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiter, BOUND)
    assert waiter.cancelled()
    assert bus.subscribers == 0


async def test_wait_refuses_no_states() -> None:
    bus = EventBus("relay")
    with pytest.raises(ValueError):
        await wait_for_state(bus, "j1", "c1", [], lambda: None, 0.2)
