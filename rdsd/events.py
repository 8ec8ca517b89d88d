"""Typed events a node emits, for programs that embed it.

An embedder runs a node inside its own asyncio program and wants to react to
what the node does: a job arriving, a destination changing state, bytes
moving, a child coming or going, a package stored or expired. The node calls
``EventBus.publish`` at each such step; the embedder iterates a
``Subscription``::

    async with bus.subscribe(job=job_id, types=DestChanged) as sub:
        async for event in sub:
            ...

Publishing happens on hot paths (every transfer chunk reports progress), so
``publish`` is synchronous, never awaits and never blocks. It must be called
from the event loop's thread; another thread hands an event over with
``loop.call_soon_threadsafe(bus.publish, event)``.

Slow consumers. The bus never blocks the publisher and never buffers more than
``maxsize`` events for one subscription. When a subscription's buffer is full
the *new* event is dropped and counted (``Subscription.dropped`` is the
running total). The next read then returns one ``EventsDropped`` carrying how
many were dropped since the previous read, followed by the kept events in
publish order. Dropping the newest rather than the oldest keeps the buffer an
unbroken run in publish order: the marker, read first, says that a gap follows
that run, and there is never a silent hole inside it. A consumer that must
not miss a state treats ``EventsDropped`` as "re-read the truth from the
database", as ``wait_for_state`` does.

Each subscription receives the events it accepts in the order they were
published, so the changes of one destination arrive in the order they
happened.
"""

from __future__ import annotations

import time as _time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType

from .domain import DestState, HelloPurpose, JobType, Role
from .errors import RdsdError

# ``asyncio`` is imported where a subscription waits, not at the top: the
# job database imports the event types, and a command that only reads it
# (``rdsd job status``) has no event loop.

__all__ = [
    "ChildConnected",
    "ChildDisconnected",
    "DestChanged",
    "Event",
    "EventBus",
    "EventBusClosed",
    "EventsDropped",
    "JobReceived",
    "PackageExpired",
    "PackageStored",
    "Subscription",
    "TransferProgress",
    "wait_for_state",
]


# -- events ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """What every event carries: which node emitted it and when.

    ``time`` is epoch seconds, filled in when the event is created, so a
    consumer that reads late still knows when the step happened.
    """

    source: str
    time: float = field(default_factory=_time.time)


@dataclass(frozen=True, slots=True, kw_only=True)
class JobReceived(Event):
    """A job reached this node (pushed by the parent or announced from
    below); the earliest point an embedder can start following it."""

    job: str
    job_type: JobType
    package: str
    destinations: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class DestChanged(Event):
    """A destination of a job moved to a new state or got a new detail.

    ``node`` is the destination node's name. ``old`` is None when the
    destination was just created. A move to the same state is a detail
    update, as in the job database.
    """

    job: str
    node: str
    package: str | None
    old: DestState | None
    new: DestState
    detail: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferProgress(Event):
    """Bytes of a package moved towards ``node``, so an embedder can show a
    progress bar without polling. ``done`` and ``total`` are bytes, ``rate``
    bytes per second. ``job`` is None for a fetch no single job owns."""

    job: str | None
    node: str
    package: str
    done: int
    total: int
    rate: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ChildConnected(Event):
    """A child completed its handshake with this node: jobs for it (and for
    the nodes behind it) can flow now if ``purpose`` is a session."""

    child: str
    role: Role
    purpose: HelloPurpose


@dataclass(frozen=True, slots=True, kw_only=True)
class ChildDisconnected(Event):
    """A child's connection ended; work for it waits until it returns.
    ``reason`` says why, for a person."""

    child: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PackageStored(Event):
    """A package is complete in this node's store and can be served or
    installed from here until ``expires`` (epoch seconds)."""

    package: str
    size: int
    expires: float


@dataclass(frozen=True, slots=True, kw_only=True)
class PackageExpired(Event):
    """A package left this node's store; fetching it again takes a transfer."""

    package: str


@dataclass(frozen=True, slots=True, kw_only=True)
class EventsDropped(Event):
    """This subscription fell behind and ``count`` events were dropped since
    its previous read. Anything derived from events may be stale: re-read
    the state that matters. Produced by the subscription itself, so it is
    delivered whatever the filters say."""

    count: int


# -- subscriptions -----------------------------------------------------------------


class EventBusClosed(RdsdError):
    """The bus closed (the node is stopping) before the awaited state came."""


def _names(value: str | Iterable[str] | None) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return frozenset((value,))
    return frozenset(value)


def _event_types(
    value: type[Event] | Iterable[type[Event]] | None,
) -> tuple[type[Event], ...] | None:
    if value is None:
        return None
    kinds = (value,) if isinstance(value, type) else tuple(value)
    for kind in kinds:
        if not (isinstance(kind, type) and issubclass(kind, Event)):
            raise TypeError(f"not an Event type: {kind!r}")
    return kinds


class Subscription:
    """One consumer's filtered, bounded view of a bus; made by
    ``EventBus.subscribe``.

    Iterate it with ``async for``; iteration ends when it is closed or the
    bus closes. ``close()`` (or leaving ``async with``) unsubscribes at once
    and discards what is buffered: the consumer said it is done. When the bus
    closes instead, the events already buffered are still delivered, then
    iteration ends, so an embedder sees a job's last steps before shutdown.

    The bus only holds a weak reference: a subscription nobody refers to any
    more (an ``async for`` left with ``break``) stops costing anything.
    Closing it explicitly still stops delivery at a known point.
    """

    __slots__ = (
        "__weakref__",
        "_buffer",
        "_bus",
        "_dropped",
        "_ended",
        "_jobs",
        "_maxsize",
        "_nodes",
        "_types",
        "_unreported",
        "_wakeup",
    )

    def __init__(
        self,
        bus: EventBus,
        jobs: frozenset[str] | None,
        nodes: frozenset[str] | None,
        types: tuple[type[Event], ...] | None,
        maxsize: int,
    ) -> None:
        self._bus = bus
        self._jobs = jobs
        self._nodes = nodes
        self._types = types
        self._maxsize = maxsize
        import asyncio

        self._buffer: deque[Event] = deque()
        self._wakeup = asyncio.Event()
        self._dropped = 0
        self._unreported = 0
        self._ended = False

    @property
    def dropped(self) -> int:
        """How many events this subscription has dropped in total."""
        return self._dropped

    @property
    def pending(self) -> int:
        """How many events are buffered and not yet read (never above maxsize)."""
        return len(self._buffer)

    @property
    def closed(self) -> bool:
        """No more events will be added: closed, or the bus closed."""
        return self._ended

    def close(self) -> None:
        """Unsubscribe, discard what is buffered and end iteration. Idempotent."""
        self._buffer.clear()
        self._unreported = 0
        if not self._ended:
            self._ended = True
            self._bus._discard(self)
            self._wakeup.set()

    def _end(self) -> None:
        """The bus closed: keep what is buffered, accept nothing more."""
        self._ended = True
        self._wakeup.set()

    def _matches(self, event: Event) -> bool:
        if self._types is not None and not isinstance(event, self._types):
            return False
        if self._jobs is not None and getattr(event, "job", None) not in self._jobs:
            return False
        if self._nodes is not None:
            nodes = self._nodes
            return (
                event.source in nodes
                or getattr(event, "node", None) in nodes
                or getattr(event, "child", None) in nodes
            )
        return True

    def _offer(self, event: Event) -> None:
        if self._ended or not self._matches(event):
            return
        if len(self._buffer) >= self._maxsize:
            self._dropped += 1
            self._unreported += 1
            return
        self._buffer.append(event)
        self._wakeup.set()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        while True:
            if self._unreported:
                count, self._unreported = self._unreported, 0
                return EventsDropped(source=self._bus.name, count=count)
            if self._buffer:
                return self._buffer.popleft()
            if self._ended:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class EventBus:
    """Fans a node's events out to any number of subscriptions.

    ``name`` is the owning node's name; it is the ``source`` of the
    ``EventsDropped`` markers subscriptions produce.
    """

    __slots__ = ("_closed", "_subs", "name")

    def __init__(self, name: str = "") -> None:
        self.name = name
        self._closed = False
        # Weak references, replaced (never mutated) on change, so publish can
        # iterate without copying even if a collection removes a subscriber
        # half-way through.
        self._subs: tuple[weakref.ref[Subscription], ...] = ()

    @property
    def subscribers(self) -> int:
        """How many live subscriptions the bus delivers to."""
        return sum(ref() is not None for ref in self._subs)

    @property
    def closed(self) -> bool:
        return self._closed

    def publish(self, event: Event) -> None:
        """Hand ``event`` to every subscription whose filters accept it.

        Never blocks and never awaits; a full subscription drops the event
        and counts it. Call from the event loop's thread. Does nothing once
        the bus is closed.
        """
        for ref in self._subs:
            sub = ref()
            if sub is not None:
                sub._offer(event)

    def subscribe(
        self,
        *,
        job: str | Iterable[str] | None = None,
        node: str | Iterable[str] | None = None,
        types: type[Event] | Iterable[type[Event]] | None = None,
        maxsize: int = 1000,
    ) -> Subscription:
        """Start receiving the events that pass every given filter.

        - ``job``: the event has a ``job`` attribute equal to one of these.
        - ``node``: the event's ``source``, or its ``node`` or ``child``
          attribute where it has one, is one of these. The source counts, so
          filtering on a node's own name also yields everything it emits.
        - ``types``: the event is an instance of one of these.

        An event without the attribute a filter looks at does not pass it
        (``PackageStored`` has no ``job``), nor does a ``None`` value; an
        empty collection passes nothing. ``EventsDropped`` is made by the
        subscription itself and always delivered. At most ``maxsize``
        events are buffered; see the module docstring for what happens past
        that. Subscribing to a closed bus gives a subscription whose
        iteration ends at once.
        """
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, not {maxsize}")
        sub = Subscription(self, _names(job), _names(node), _event_types(types), maxsize)
        if self._closed:
            sub._end()
        else:
            self._subs = (*self._subs, weakref.ref(sub, self._forget))
        return sub

    def close(self) -> None:
        """End every subscription's iteration (after its buffered events)
        and ignore later publishes. Idempotent."""
        self._closed = True
        subs, self._subs = self._subs, ()
        for ref in subs:
            sub = ref()
            if sub is not None:
                sub._end()

    def _discard(self, sub: Subscription) -> None:
        self._subs = tuple(ref for ref in self._subs if ref() is not sub)

    def _forget(self, dead: weakref.ref[Subscription]) -> None:
        self._subs = tuple(ref for ref in self._subs if ref is not dead)


# -- waiting for a state -----------------------------------------------------------


async def wait_for_state(
    bus: EventBus,
    job: str,
    node: str,
    states: DestState | Iterable[DestState],
    current: Callable[[], DestState | None],
    timeout: float | None,
) -> DestState:
    """Wait until destination ``node`` of ``job`` is in one of ``states``
    and return that state.

    ``current`` returns the destination's state now (None if it does not
    exist yet). The subscription is made before ``current`` is first asked,
    so a change landing between the check and the wait still arrives as an
    event. After ``EventsDropped`` the change may be among the dropped, so
    ``current`` is asked again. Raises ``TimeoutError`` after ``timeout``
    seconds (None waits without limit) and ``EventBusClosed`` if the bus
    closes first.
    """
    import asyncio

    wanted = frozenset((DestState(states),) if isinstance(states, str) else states)
    if not wanted:
        raise ValueError("no states to wait for")
    async with (
        asyncio.timeout(timeout),
        bus.subscribe(job=job, node=node, types=DestChanged) as sub,
    ):
        state = current()
        if state is not None and state in wanted:
            return state
        async for event in sub:
            if isinstance(event, EventsDropped):
                state = current()
                if state is not None and state in wanted:
                    return state
            elif isinstance(event, DestChanged) and event.node == node and event.new in wanted:
                return event.new
        # The bus closed; the last change may have been recorded but not seen.
        state = current()
        if state is not None and state in wanted:
            return state
        raise EventBusClosed(f"event bus closed while waiting for {job} on {node}")
