"""Moving one package across one hop, both ends.

The sending end streams chunks out of the store (checked against their
signed digests only when the package may have changed at rest: see
``store``) and the receiving end writes each chunk only after it matches.
How a failed transfer continues depends on the hop, as the design says:
below the managing server (and between relays) the receiver keeps its
verified prefix and asks again from that byte offset; below a relay, a
client throws its partial copy away and starts from byte zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable

import structlog

from protocol import Chunk, Fetch, FetchCancel, FetchEnd, FetchFail, Message

from ..errors import (
    CorruptChunk,
    DiskFull,
    ExpiredPackage,
    RdsdError,
    SessionClosed,
    StoreError,
    TransferFailed,
    TransferPaused,
)
from ..packages.download import Download
from ..packages.manifest import Manifest
from ..packages.store import Store
from ..util.turns import take_turn
from .observe import TrafficObserver
from .pace import Pacer
from .session import Session

log = structlog.get_logger("rdsd.transfer")
#: Chunks that may wait between the session reader and a fetch: with the
#: download's own IN_FLIGHT and the socket's buffers, enough to keep the link busy.
QUEUE_DEPTH = 4
#: How long a fetch may wait for a chunk while its session lives: the parent
#: may be serving as many children as it serves at once, and a parent that
#: paces (its upload limits are not known here) may wait between chunks.
CHUNK_WAIT = 300.0


async def serve_fetch(
    session: Session,
    store: Store,
    fetch: Fetch,
    node: str,
    observer: TrafficObserver | None = None,
    pacer: Pacer | None = None,
) -> None:
    """Send ``fetch.package`` from ``fetch.offset`` to the end, then FETCH_END;
    any store problem becomes FETCH_FAIL with the reason. The observer, if
    any, hears how many package bytes went to each peer. The pacer, if any,
    lets each chunk go when the limits allow (control messages on the same
    session do not wait for it)."""
    peer = session.peer.name
    bound = log.bind(node=node, peer=peer, package=fetch.package)
    sent = 0
    try:
        async for offset, data in store.chunks(fetch.package, fetch.offset):
            # One chunk per turn: this is where sending is paced, per chunk.
            if pacer is not None:
                await pacer.take(len(data))
            # Sixty-four serves writing a chunk each would fill one turn.
            await take_turn()
            await session.send(Chunk(fetch_id=fetch.fetch_id, offset=offset, data=data))
            sent += len(data)
            if observer is not None:
                observer.package_served(peer, len(data))
    except CorruptChunk as exc:
        bound.error("serve.corrupt", offset=exc.offset)
        store.quarantine(fetch.package, exc.offset)
        await session.send(FetchFail(fetch_id=fetch.fetch_id, reason=str(exc)))
        return
    except (StoreError, OSError, TimeoutError) as exc:
        reason = str(exc) or type(exc).__name__
        bound.warning("serve.failed", reason=reason)
        await session.send(FetchFail(fetch_id=fetch.fetch_id, reason=reason))
        return
    except asyncio.CancelledError:
        if not session.closed:
            await session.send(FetchFail(fetch_id=fetch.fetch_id, reason="cancelled"))
        raise
    await session.send(FetchEnd(fetch_id=fetch.fetch_id, size=fetch.offset + sent))
    bound.info("serve.done", offset=fetch.offset, bytes=sent)


class FetchRouter:
    """Hands the parent's answers to each running fetch on one session.

    The session's single reader puts messages here; each fetch reads its own
    bounded queue, so a slow disk pushes back on the socket rather than
    growing memory.
    """

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._queues: dict[int, asyncio.Queue[Message | None]] = {}
        self._wakers: dict[int, asyncio.Task[None]] = {}

    def open(self) -> tuple[int, asyncio.Queue[Message | None]]:
        fid = next(self._ids)
        q: asyncio.Queue[Message | None] = asyncio.Queue(QUEUE_DEPTH)
        self._queues[fid] = q
        return fid, q

    def close(self, fid: int) -> None:
        q = self._queues.pop(fid, None)
        # The session's reader may be blocked putting into this full queue:
        # empty it so the reader moves on (later messages for fid are dropped).
        while q is not None and not q.empty():
            q.get_nowait()
        waker = self._wakers.pop(fid, None)
        if waker is not None:
            waker.cancel()

    async def deliver(self, msg: Chunk | FetchEnd | FetchFail) -> None:
        q = self._queues.get(msg.fetch_id)
        if q is not None:
            await q.put(msg)

    def session_lost(self) -> None:
        """Tell every running fetch its session is gone, after the chunks it
        already has (they are good and will be written)."""
        for fid, q in self._queues.items():
            if fid not in self._wakers:
                self._wakers[fid] = asyncio.create_task(q.put(None))


async def receive(
    session: Session,
    router: FetchRouter,
    dl: Download,
    timeout: float,
    node: str,
    progress: Callable[[int, int], None] | None = None,
    progress_every: float = 5.0,
    rate: float = 0.0,
    pause: Callable[[], bool] | None = None,
) -> None:
    """One attempt to complete ``dl`` from ``session``, from its verified
    offset. Raises TransferFailed; CorruptChunk counts as retryable.

    Each chunk may take up to CHUNK_WAIT (or ``timeout`` if longer):
    a parent serving many children serves a bounded number at once and the
    rest wait their turn, and a parent pacing its children may wait between
    chunks. A lost session (the session's own idle timeout and pings find
    one) ends the wait at once either way.

    ``rate`` asks the parent to send at most that many bytes per second (0:
    no limit). ``pause``, asked after each chunk is written, ends the
    attempt with ``TransferPaused`` (the fetch cancelled, every verified
    chunk kept) when it says so: a transfer window closed."""
    m: Manifest = dl.manifest
    fid, q = router.open()
    start = dl.verified
    last = time.monotonic()
    bound = log.bind(node=node, peer=session.peer.name, package=m.id)
    bound.info("fetch.start", offset=start, size=m.size)
    try:
        try:
            await session.send(Fetch(fetch_id=fid, package=m.id, offset=start, rate=rate))
        except SessionClosed as exc:
            raise TransferFailed(f"link lost: {exc}") from None
        limit = max(timeout, CHUNK_WAIT)
        while True:
            try:
                async with asyncio.timeout(limit):
                    msg = await q.get()
            except TimeoutError:
                await _store_step(dl.flush())
                raise TransferFailed(f"no data from {session.peer.name} for {limit:.0f}s") from None
            if msg is None:
                # Keep every chunk already received: the resume starts after them.
                await _store_step(dl.flush())
                raise TransferFailed(f"link lost: {session.close_reason}")
            if isinstance(msg, Chunk):
                # One chunk per turn: checked, then written by the download's
                # thread while the next arrives (the gate between chunks).
                try:
                    await _store_step(dl.write_chunk(msg.offset, msg.data))
                except TransferFailed:
                    await _cancel(session, fid)
                    raise
                now = time.monotonic()
                if progress is not None and now - last >= progress_every:
                    last = now
                    progress(dl.verified, m.size)
                if pause is not None and pause():
                    await _cancel(session, fid)
                    await _store_step(dl.flush())
                    raise TransferPaused(f"paused at byte {dl.verified}")
            elif isinstance(msg, FetchFail):
                # An expired package stays expired: asking again cannot help.
                raise TransferFailed(
                    f"{session.peer.name} refused: {msg.reason}",
                    retryable="expired" not in msg.reason,
                )
            elif isinstance(msg, FetchEnd):
                break
        await _store_step(dl.finish())
        bound.info("fetch.done", resumed_from=start, bytes=m.size - start)
    finally:
        router.close(fid)


async def _store_step(step: Awaitable[None]) -> None:
    """Run a store operation, turning its failures into TransferFailed."""
    try:
        await step
    except (StoreError, OSError) as exc:
        raise store_failure(exc) from None


def store_failure(exc: StoreError | OSError | RdsdError) -> TransferFailed:
    """A store failure as the attempt's end: a bad chunk may go better next
    time, a full disk will not."""
    if isinstance(exc, TransferFailed):
        return exc
    if isinstance(exc, CorruptChunk):
        return TransferFailed(str(exc))
    if isinstance(exc, DiskFull | ExpiredPackage):
        return TransferFailed(str(exc), retryable=False)
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        return TransferFailed(f"cannot store{where}: {exc.strerror or exc}", retryable=False)
    return TransferFailed(str(exc))


async def _cancel(session: Session, fid: int) -> None:
    with contextlib.suppress(SessionClosed):
        await session.send(FetchCancel(fetch_id=fid))
