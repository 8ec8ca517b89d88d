"""A fault-injecting TCP proxy for tests, on 127.0.0.1 only.

``FaultProxy`` listens on 127.0.0.1 port 0 and forwards every connection it
accepts to one target on 127.0.0.1. Each accepted connection gets a *plan*,
a list of faults, chosen by its index (0 for the first connection, 1 for the
second, ...); connections without a plan of their own get the default plan
(pass-through unless told otherwise)::

    async with FaultProxy(server.address, plans={0: [cut(200_000)]}) as proxy:
        relay_cfg = replace(relay_cfg, parent=proxy.address)
        ...
        proxy.connections[0].forwarded[DOWN]   # bytes that reached the relay

Directions are named from the connecting side: ``UP`` is connector → target
(a child talking to its parent), ``DOWN`` is target → connector (the parent
sending to its child, where package data flows).

Faults:

- ``cut(n, d)``: forward ``n`` bytes in direction ``d``, then close both
  sides (FIN), as a cable pulled mid-transfer looks to a process.
- ``reset(n, d)``: the same, but abort both sides with SO_LINGER 0 (RST).
- ``stall(n, d)``: forward ``n`` bytes in direction ``d``, then stop reading
  and forwarding in that direction while keeping the connection open (the
  other direction keeps flowing); ``ConnStats.unstall()`` lets it go on.
- ``delay(s, d)``: sleep ``s`` seconds before each write (``d=None``: both).
- ``split(size, d)``: forward in writes of at most ``size`` bytes.

``cut``, ``reset`` and ``stall`` take ``at_record_end=True`` to fire at the
first TLS record boundary at or after ``n`` instead (the proxy follows the
TLS record headers, which travel in clear), so a test can cut exactly where
a record that completes a chunk ends. ``buffer`` fixes the proxy's receive
buffer towards the target (default: the kernel's autotuning); ``on_fire`` is
called the moment a trigger fires, before anything is closed.

Byte counts (``ConnStats.forwarded``) are what the proxy has written to the
other side, per connection and direction; ``ConnStats.records`` holds the
TLS record boundaries seen in each direction.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType

LOOPBACK = "127.0.0.1"
TLS_HEADER = 5
# TLS 1.3 AEAD: 1 byte inner content type + 16 bytes tag inside each record.
TLS13_OVERHEAD = TLS_HEADER + 1 + 16


class Direction(StrEnum):
    UP = "up"  # connector -> target
    DOWN = "down"  # target -> connector


UP = Direction.UP
DOWN = Direction.DOWN

TRIGGERS = ("cut", "reset", "stall")


@dataclass(frozen=True)
class Fault:
    """One fault of a plan; build it with the functions below."""

    kind: str
    direction: Direction | None = DOWN
    after: int = 0
    seconds: float = 0.0
    size: int = 0
    at_record_end: bool = False

    def applies(self, d: Direction) -> bool:
        return self.direction is None or self.direction is d


def cut(after: int, direction: Direction = DOWN, at_record_end: bool = False) -> Fault:
    return Fault("cut", direction, after=after, at_record_end=at_record_end)


def reset(after: int, direction: Direction = DOWN, at_record_end: bool = False) -> Fault:
    return Fault("reset", direction, after=after, at_record_end=at_record_end)


def stall(after: int, direction: Direction = DOWN, at_record_end: bool = False) -> Fault:
    return Fault("stall", direction, after=after, at_record_end=at_record_end)


def delay(seconds: float, direction: Direction | None = None) -> Fault:
    return Fault("delay", direction, seconds=seconds)


def split(size: int, direction: Direction | None = None) -> Fault:
    if size <= 0:
        raise ValueError("split size must be positive")
    return Fault("split", direction, size=size)


PASS: tuple[Fault, ...] = ()


class RecordTracker:
    """Follows TLS record headers in one direction of a stream."""

    def __init__(self) -> None:
        self.pos = 0  # stream bytes seen
        self.next_header = 0  # stream offset of the next record header
        self._header = bytearray()
        self.ends: list[int] = []  # stream offset just past each record
        self.sizes: list[int] = []  # the length field of each record

    def feed(self, data: bytes) -> None:
        end = self.pos + len(data)
        while True:
            need_at = self.next_header + len(self._header)
            if need_at >= end:
                break
            i = need_at - self.pos
            self._header += data[i : i + TLS_HEADER - len(self._header)]
            if len(self._header) < TLS_HEADER:
                break
            (length,) = struct.unpack(">H", bytes(self._header[3:5]))
            record_end = self.next_header + TLS_HEADER + length
            self.ends.append(record_end)
            self.sizes.append(length)
            self.next_header = record_end
            self._header.clear()
        self.pos = end

    def first_end_at_or_after(self, offset: int) -> int | None:
        for e in self.ends:
            if e >= offset:
                return e
        return None


@dataclass
class ConnStats:
    """What one proxied connection did."""

    index: int
    plan: tuple[Fault, ...]
    forwarded: dict[Direction, int] = field(default_factory=lambda: {UP: 0, DOWN: 0})
    records: dict[Direction, RecordTracker] = field(
        default_factory=lambda: {UP: RecordTracker(), DOWN: RecordTracker()}
    )
    fired: Fault | None = None
    fired_at: int | None = None
    triggered: asyncio.Event = field(default_factory=asyncio.Event)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    _unstall: asyncio.Event = field(default_factory=asyncio.Event)

    def unstall(self) -> None:
        """Let a stalled direction flow again."""
        self._unstall.set()

    @property
    def stalled(self) -> bool:
        return self.fired is not None and self.fired.kind == "stall" and not self._unstall.is_set()


class _Done(Exception):
    """A trigger fired: tear the connection down as the fault says."""

    def __init__(self, fault: Fault) -> None:
        self.fault = fault


class FaultProxy:
    """``async with FaultProxy((host, port), plans={k: [...]}) as proxy``."""

    def __init__(
        self,
        target: tuple[str, int],
        plans: Mapping[int, Sequence[Fault]] | None = None,
        default: Sequence[Fault] = PASS,
        read_size: int = 64 * 1024,
        buffer: int | None = None,
        on_fire: Callable[[ConnStats], None] | None = None,
    ) -> None:
        host, port = target
        if host != LOOPBACK:
            raise ValueError(f"FaultProxy forwards to {LOOPBACK} only, not {host!r}")
        self.target = (host, int(port))
        self.plans: dict[int, tuple[Fault, ...]] = {k: tuple(v) for k, v in (plans or {}).items()}
        self.default = tuple(default)
        self.read_size = read_size
        self.buffer = buffer
        self.on_fire = on_fire
        self.connections: list[ConnStats] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._new_conn = asyncio.Event()

    # -- set-up -------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None and self._server.sockets
        return LOOPBACK, int(self._server.sockets[0].getsockname()[1])

    @property
    def port(self) -> int:
        return self.address[1]

    def set_plan(self, index: int, plan: Sequence[Fault]) -> None:
        self.plans[index] = tuple(plan)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, LOOPBACK, 0)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            _abort(w)
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- observing ----------------------------------------------------------

    def total(self, d: Direction) -> int:
        return sum(c.forwarded[d] for c in self.connections)

    async def wait_connections(self, n: int, timeout: float = 10.0) -> ConnStats:
        """Until at least ``n`` connections were accepted; the n-th one."""
        async with asyncio.timeout(timeout):
            while len(self.connections) < n:
                self._new_conn.clear()
                await self._new_conn.wait()
        return self.connections[n - 1]

    # -- forwarding ---------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        # Swallow our own shutdown's cancel: asyncio's server callback would
        # otherwise log the cancelled handler as an error.
        with contextlib.suppress(asyncio.CancelledError):
            await self._serve(task, reader, writer)

    async def _serve(
        self, task: asyncio.Task[None], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        index = len(self.connections)
        stats = ConnStats(index, self.plans.get(index, self.default))
        self.connections.append(stats)
        self._new_conn.set()
        self._writers.add(writer)
        up_writer: asyncio.StreamWriter | None = None
        try:
            try:
                async with asyncio.timeout(5):
                    up_reader, up_writer = await self._connect_target()
            except (OSError, TimeoutError):
                _abort(writer)
                return
            self._writers.add(up_writer)
            pumps = [
                asyncio.create_task(self._pump(stats, UP, reader, up_writer)),
                asyncio.create_task(self._pump(stats, DOWN, up_reader, writer)),
            ]
            try:
                await self._run_pumps(stats, pumps, writer, up_writer)
            finally:
                for p in pumps:
                    p.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    self._writers.discard(w)
                    with contextlib.suppress(Exception):
                        w.close()
            stats.closed.set()
            self._tasks.discard(task)

    async def _connect_target(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.buffer is None:
            return await asyncio.open_connection(*self.target)
        # A fixed receive buffer (set before connecting, so the window is
        # clamped from the start) bounds what the target can have in flight.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.buffer)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, self.target)
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    async def _run_pumps(
        self,
        stats: ConnStats,
        pumps: list[asyncio.Task[None]],
        down_side: asyncio.StreamWriter,
        up_side: asyncio.StreamWriter,
    ) -> None:
        pending = set(pumps)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                exc = t.exception()
                if exc is None:
                    if stats.stalled:  # one side left; nothing will move again
                        down_side.close()
                        up_side.close()
                        return
                    continue  # clean EOF in that direction, already passed on
                if isinstance(exc, _Done):
                    stats.fired = exc.fault
                    if exc.fault.kind == "reset":
                        _abort(down_side, rst=True)
                        _abort(up_side, rst=True)
                    else:
                        down_side.close()
                        up_side.close()
                else:  # a reset or broken pipe on one side: drop both
                    _abort(down_side)
                    _abort(up_side)
                stats.triggered.set()
                return

    async def _pump(
        self,
        stats: ConnStats,
        d: Direction,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        faults = [f for f in stats.plan if f.applies(d)]
        pause = sum(f.seconds for f in faults if f.kind == "delay")
        pieces = min((f.size for f in faults if f.kind == "split"), default=0)
        trigger = next((f for f in faults if f.kind in TRIGGERS), None)
        tracker = stats.records[d]
        while True:
            data = await reader.read(self.read_size)
            if not data:
                if writer.can_write_eof():
                    with contextlib.suppress(OSError, RuntimeError):
                        writer.write_eof()
                return
            tracker.feed(data)
            if trigger is not None and stats.fired is None:
                limit = self._limit(trigger, tracker)
                if limit is not None and stats.forwarded[d] + len(data) >= limit:
                    head = data[: max(0, limit - stats.forwarded[d])]
                    await self._write(stats, d, writer, head, pause, pieces)
                    stats.fired_at = stats.forwarded[d]
                    stats.fired = trigger
                    if self.on_fire is not None:
                        self.on_fire(stats)
                    if trigger.kind != "stall":
                        raise _Done(trigger)
                    stats.triggered.set()
                    await stats._unstall.wait()
                    data = data[len(head) :]
            await self._write(stats, d, writer, data, pause, pieces)

    @staticmethod
    def _limit(trigger: Fault, tracker: RecordTracker) -> int | None:
        if not trigger.at_record_end:
            return trigger.after
        return tracker.first_end_at_or_after(trigger.after)

    @staticmethod
    async def _write(
        stats: ConnStats,
        d: Direction,
        writer: asyncio.StreamWriter,
        data: bytes,
        pause: float,
        pieces: int,
    ) -> None:
        step = pieces or max(len(data), 1)
        for i in range(0, len(data), step):
            piece = data[i : i + step]
            if pause:
                await asyncio.sleep(pause)
            writer.write(piece)
            await writer.drain()
            stats.forwarded[d] += len(piece)


def _abort(writer: asyncio.StreamWriter, rst: bool = False) -> None:
    sock = writer.get_extra_info("socket")
    if rst and sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


__all__ = [
    "DOWN",
    "LOOPBACK",
    "PASS",
    "TLS13_OVERHEAD",
    "UP",
    "ConnStats",
    "Direction",
    "Fault",
    "FaultProxy",
    "cut",
    "delay",
    "reset",
    "split",
    "stall",
]
