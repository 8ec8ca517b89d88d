"""The node's background duties: noticing changes, pushing work, expiry,
and telling the parent what it must know.

Admin commands write the job database from another process; the poll loop
notices that through SQLite's ``data_version`` (one PRAGMA per idle poll)
and runs one pass when anything changed, when the node itself woke it, or
when a scheduled execution time came due. A pass pushes due work to
children, tells the parent about the subtree and holdings (on a relay),
sends queued reports up and starts due jobs of this node.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import structlog

from protocol import (
    MAX_PRESENCE_BATCH,
    MAX_SOFTWARE,
    MAX_TOPOLOGY_BATCH,
    Holdings,
    JobAnnounce,
    Presence,
    Topology,
)

from ..domain import DestState, JobPace
from ..errors import IllegalTransition, SessionClosed
from ..events import PackageExpired
from ..util.turns import take_turn
from ..util.windows import pace_to_wire

if TYPE_CHECKING:
    from ..net.session import Session
    from .node import Node

log = structlog.get_logger("rdsd.node")
#: Seconds between checkpoints of the database's write-ahead log (a few
#: hundred commits' worth at a fleet's busiest; nothing to do when idle).
CHECKPOINT_EVERY = 1.0


class Housekeeper:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.cfg = node.cfg
        self.log = node.log
        self._wake = asyncio.Event()
        self._version = -1
        self._due: float | None = None
        self.tell_parent = False
        self.revocations_changed = False
        # What the parent has been told of the subtree (each node's claim as
        # its ``_sent_mark``), on which session; the names changed since (or,
        # with _topology_full, possibly any).
        self._topology_sent: dict[str, int] = {}
        self._topology_session: Session | None = None
        self._topology_dirty: set[str] = set()
        self._topology_full = True
        self._held: dict[str, float] = {}
        self._store_mtime = 0
        # What the parent has been told of who is connected below us (each
        # node's parent and software as its ``_sent_mark``), and on which
        # session: a new session starts again from a full snapshot.
        self._presence_sent: dict[str, int] = {}
        self._presence_session: Session | None = None
        # The names whose connection changed since (a child connected or
        # went, a relay below sent PRESENCE): only they are read again, so a
        # storm of ten thousand children connecting costs a pass what
        # changed, not the whole subtree each time; with _presence_full,
        # everything is read again.
        self._presence_dirty: set[str] = set()
        self._presence_full = True

    def wake(self) -> None:
        """Something changed: run a pass soon."""
        self._wake.set()

    async def poll(self) -> None:
        """Run passes for as long as the node runs."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.cfg.poll_interval):
                    await self._wake.wait()
            # Read the flag itself: a wake() in the same step as the timeout
            # must not be lost.
            woken = self._wake.is_set()
            self._wake.clear()
            try:
                await self.tick(woken)
            except Exception:
                self.log.exception("node.tick_failed")

    async def tick(self, woken: bool = True) -> None:
        node = self.node
        db = node.db
        version = db.data_version()
        now = time.time()
        due = self._due is not None and self._due <= now
        changed_elsewhere = version != self._version  # an admin command committed
        if not (woken or due or changed_elsewhere):
            if node.uplink is not None and node.uplink.ack_overdue():
                # Sent and not acknowledged for an idle timeout (the parent
                # could not record it): send it again on this session.
                if db.outbox_after(0) or db.unannounced():
                    node.uplink.resend()
                    await self.flush_outbox()
                else:
                    node.uplink.acked()
            return
        self._version = version
        self._due = db.next_due(now)
        if node.downlinks is not None:
            # Routes only what changed since the last pass: cheap when nothing did.
            await node.downlinks.push_changes(now)
            if changed_elsewhere or self.revocations_changed:
                self.revocations_changed = False
                node.downlinks.push_revocations()
        if node.uplink is not None:
            if self.tell_parent or (node.parts.forwards_up and self._holdings_changed()):
                await self.describe_subtree()
            await self.send_presence()
            await self.flush_outbox()
        if node.runner is not None:
            node.runner.kick()

    # -- the database's write-ahead log ----------------------------------------------

    async def checkpointer(self, every: float = CHECKPOINT_EVERY) -> None:
        """Copy the database's write-ahead log into the database in a
        thread, ``every`` seconds, instead of inside whichever commit on the
        loop takes the log past SQLite's limit (the node calls
        ``Database.defer_checkpoints`` before this starts).
        A checkpoint in progress when the node stops is waited for, so the
        database closes after it."""
        db = self.node.db
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every)
            done = loop.run_in_executor(None, db.checkpoint)
            try:
                await asyncio.shield(done)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await done
                raise
            except sqlite3.Error as exc:
                # A full disk, say: the next one tries again, and commits go on.
                self.log.warning("db.checkpoint_failed", reason=str(exc))

    # -- expiry ------------------------------------------------------------------

    async def sweeper(self) -> None:
        """Delete each package when its keep time is over: a timer set from
        the earliest expiry in the store, re-armed whenever the store
        changes (a package stored, re-kept, deleted, or no longer used).
        ``sweep_interval`` only bounds how long it sleeps."""
        store = self.node.store
        changed = asyncio.Event()
        store.watchers.append(changed.set)
        try:
            while True:
                changed.clear()
                try:
                    self.sweep()
                    delay = self._next_expiry(time.time())
                except Exception:
                    self.log.exception("node.sweep_failed")
                    delay = self.cfg.sweep_interval
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await changed.wait()
        finally:
            store.watchers.remove(changed.set)

    def _next_expiry(self, now: float) -> float:
        """Seconds until the next package this sweep could delete expires; one
        in use past its expiry waits for the store to say it is free."""
        store = self.node.store
        soonest = min(
            (
                m.expires
                for m in store.manifests()
                if not (store.expired(m, now) and store.in_use(m.id))
            ),
            default=now + self.cfg.sweep_interval,
        )
        return min(max(soonest - now, 0.0), self.cfg.sweep_interval)

    def sweep(self, now: float | None = None) -> list[str]:
        """Delete packages whose keep time is over, except one being served
        or downloaded right now (it goes on a later sweep). The parent learns
        it from the next HOLDINGS."""
        store = self.node.store
        now = time.time() if now is None else now
        gone = []
        for m in store.manifests():
            if store.expired(m, now) and not store.in_use(m.id):
                store.delete(m.id)
                gone.append(m.id)
                self.log.info("package.expired", package=m.id)
                self.node.bus.publish(PackageExpired(source=self.cfg.name, package=m.id))
                self._expire_offers(m.id)
        if gone:
            self.wake()
        return gone

    def _expire_offers(self, package: str) -> None:
        """An offer whose package expired can no longer be chosen: say so."""
        db, me = self.node.db, self.cfg.name
        for job in db.jobs():
            dest = db.dest(job.id, me) if job.package == package else None
            if dest is not None and dest.state is DestState.OFFERED:
                with contextlib.suppress(IllegalTransition):
                    db.change(
                        job.id,
                        me,
                        DestState.FAILED,
                        "the offer expired before it was installed",
                        me,
                        report=True,
                        package=package,
                    )

    # -- telling the parent --------------------------------------------------------

    async def flush_outbox(self) -> None:
        """Announce jobs made here, then send queued reports: the parent must
        know a job before it hears how it went."""
        node = self.node
        if node.uplink is None:
            return
        if node.parts.forwards_up:
            node.uplink.send_up(
                [
                    (
                        f"job:{job.id}",
                        JobAnnounce(
                            job=job.id,
                            type=job.type,
                            package=job.package,
                            destinations=[d.node for d in node.db.dests(job.id)],
                            origin=job.origin,
                            at=job.at,
                            manifest=job.manifest,
                            **_pace_fields(node.db.job_pace(job.id)),
                        ),
                    )
                    for job in node.db.unannounced()
                ]
            )
        uplink = node.uplink
        while True:
            await take_turn()  # a relay forwards thousands at once: in turns
            rows = node.db.outbox_after(uplink.reports_upto, limit=200)
            if not rows or not uplink.send_reports(rows):
                break

    def presence_changed(self, names: Iterable[str] | None) -> None:
        """Who is connected below this relay changed: ``names``, or (None) any."""
        if names is None:
            self._presence_full = True
        else:
            self._presence_dirty.update(names)
        self.wake()

    def topology_changed(self, names: Iterable[str] | None) -> None:
        """Routes below this relay changed: for ``names``, or (None) for any."""
        if names is None:
            self._topology_full = True
        else:
            self._topology_dirty.update(names)
        self.tell_parent = True
        self.wake()

    async def describe_subtree(self) -> None:
        """A relay tells its parent which nodes are behind it (so jobs for
        them are routed here) and what its cache holds: the whole subtree on
        a new session (in batches), afterwards only the nodes that changed,
        so a storm of children connecting costs the parent what changed.
        Each node goes up as its own attach claim, forwarded unchanged; a
        node whose claim this relay does not hold is not claimed."""
        node = self.node
        session = node.uplink.session if node.uplink else None
        if not node.parts.forwards_up or session is None or session.closed:
            return
        self.tell_parent = False
        me = self.cfg.name
        reset = self._topology_full or session is not self._topology_session
        dirty, self._topology_dirty = self._topology_dirty, set()
        self._topology_full = False
        added: dict[str, bytes] = {}
        removed: list[str] = []
        if reset:
            subtree = node.db.subtree_claims(me)
            # Parents before their children, so each batch's chains of
            # claims lead up to this relay by what the parent has seen.
            added = {n: subtree[n][0] for n in parents_first(subtree)}
            now = {n: _sent_mark(claim) for n, claim in added.items()}
        else:
            rows = node.db.claim_index(dirty)
            now = dict(self._topology_sent)
            for name in parents_first({n: (b"", r.parent) for n, r in rows.items()}):
                row = rows[name]
                if name != me and row.via and not row.revoked and row.claim is not None:
                    mark = _sent_mark(row.claim)
                    if now.get(name) != mark:
                        added[name], now[name] = row.claim, mark
                elif now.pop(name, None) is not None:
                    removed.append(name)
            for name in sorted(dirty - set(rows) - {me}):
                if now.pop(name, None) is not None:
                    removed.append(name)
        self._held = self.holdings()
        try:
            for msg in topology_batches(added, removed, reset):
                session.send_nowait(msg)
            session.send_nowait(Holdings(packages=self._held))
        except SessionClosed:
            self.tell_parent = self._topology_full = True
            return
        self._topology_session, self._topology_sent = session, now

    async def send_presence(self) -> None:
        """A relay tells its parent who below it is connected: everything,
        with ``reset``, on a new session; afterwards only what changed, read
        for the names that changed. In batches of at most
        MAX_PRESENCE_BATCH names."""
        node = self.node
        session = node.uplink.session if node.uplink else None
        if not node.parts.forwards_up or session is None or session.closed:
            return
        reset = session is not self._presence_session
        full = reset or self._presence_full
        if not (full or self._presence_dirty):
            return
        dirty, self._presence_dirty, self._presence_full = self._presence_dirty, set(), False
        before = {} if reset else self._presence_sent
        if full:
            current = node.db.online()
            offline = sorted(set(before) - set(current))
        else:
            current = node.db.online_of(dirty)
            offline = sorted(n for n in dirty - set(current) if n in before)
        marks = {n: _sent_mark(v) for n, v in current.items()}
        changed = [(n, current[n]) for n in sorted(current) if before.get(n) != marks[n]]
        # Each node goes up with its own attach claim; one this relay does
        # not hold cannot be shown online above.
        claims = node.db.claim_index(n for n, _ in changed)
        online = [
            (n, (claim, software))
            for n, (_, software) in changed
            if (claim := claims[n].claim if n in claims else None) is not None
        ]
        if not (reset or online or offline):
            return
        try:
            for msg in presence_batches(online, offline, reset):
                session.send_nowait(msg)
        except SessionClosed:
            self._presence_session = None
            self._presence_full = True
            return
        if full:
            self._presence_sent = marks
        else:
            for name in offline:
                del self._presence_sent[name]
            self._presence_sent.update(marks)
        self._presence_session = session

    def holdings(self) -> dict[str, float]:
        return {m.id: m.expires for m in self.node.store.manifests()}

    def _holdings_changed(self) -> bool:
        """Has the store changed what a relay holds? Anything that adds,
        replaces or removes a package renames or unlinks in the store's
        directory, so its modification time says whether to look; a time
        still within the clock's granularity is looked at again."""
        mtime = os.stat(self.node.store.root).st_mtime_ns
        if mtime == self._store_mtime and time.time_ns() - mtime > 2_000_000_000:
            return False
        self._store_mtime = mtime
        return self.holdings() != self._held


def parents_first(claims: dict[str, tuple[bytes, str | None]]) -> list[str]:
    """Names of ``claims`` (name to claim and the parent it names) ordered
    so that a parent in the set comes before the nodes under it."""
    depth: dict[str, int] = {}
    for name in claims:
        path = []
        at: str | None = name
        while at is not None and at in claims and at not in depth and at not in path:
            path.append(at)
            at = claims[at][1]
        base = depth.get(at, 0) if at is not None else 0
        for step in reversed(path):
            base += 1
            depth[step] = base
    return sorted(claims, key=lambda n: (depth[n], n))


def _sent_mark(value: bytes | tuple[str, str]) -> int:
    """What is remembered of a value told to the parent, to see whether it
    changed: its hash, not the value. A relay remembers this for every node
    below it, and the values (an attach claim, a parent and a software
    string) were about 0.4 KiB a node. Hashes are keyed per process, so a
    child cannot make a changed claim look unchanged."""
    return hash(value)


def topology_batches(added: dict[str, bytes], removed: list[str], reset: bool) -> list[Topology]:
    """A subtree change as TOPOLOGY messages within the cap; the first
    carries ``reset``. An empty reset is one empty message. ``added`` keeps
    its order (parents first)."""
    items: list[tuple[str, bytes | None]] = [*added.items(), *((n, None) for n in removed)]
    out = []
    for start in range(0, max(len(items), 1), MAX_TOPOLOGY_BATCH):
        part = items[start : start + MAX_TOPOLOGY_BATCH]
        out.append(
            Topology(
                nodes={n: claim for n, claim in part if claim is not None},
                removed=[n for n, claim in part if claim is None],
                reset=reset and start == 0,
            )
        )
    return out if (items or reset) else []


def presence_batches(
    online: list[tuple[str, tuple[bytes, str]]], offline: list[str], reset: bool
) -> list[Presence]:
    """Split a presence change into PRESENCE messages within the cap; the
    first carries ``reset``. An empty reset is one empty message. Each
    online node is (its attach claim, its software)."""
    items: list[tuple[str, tuple[bytes, str] | None]] = [
        *online,
        *((n, None) for n in offline),
    ]
    out = []
    for start in range(0, max(len(items), 1), MAX_PRESENCE_BATCH):
        part = items[start : start + MAX_PRESENCE_BATCH]
        out.append(
            Presence(
                online={n: v[0] for n, v in part if v is not None},
                offline=[n for n, v in part if v is None],
                software={n: v[1][:MAX_SOFTWARE] for n, v in part if v is not None and v[1]},
                reset=reset and start == 0,
            )
        )
    return out if (items or reset) else []


def _pace_fields(pace: JobPace) -> dict[str, Any]:
    """A job's rate and windows as JOB_ANNOUNCE fields."""
    rate, windows = pace_to_wire(pace)
    return {"rate": rate, "windows": windows}
