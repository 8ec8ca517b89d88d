"""Jobs, their destinations, and every destination state change.

The two ways a state changes, here (``change``) or reported from below
(``apply_report``), both go through the lifecycle table in this one place:
``domain.can_move`` for a change made here, ``domain.can_report`` for a
report (which may skip a passing state whose report it overtook). A local
change and the report that carries it upward commit in one transaction; a
report from below is applied only if its ``seq`` is newer than the last one
applied from the same origin, so repeats and reordering change nothing.

Every write that records a job or moves a destination, including a move to
the same state (a new detail) and a retry's reset to waiting, hands typed
events (``JobReceived``, ``DestChanged`` with the state read inside the same
transaction as ``old``) to the listener after its commit; see
``Database.listen``.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from enum import Enum
from typing import TYPE_CHECKING, Any

from ..domain import (
    CLOCK_SKEW,
    FINAL_STATES,
    RESTARTABLE,
    Dest,
    DestState,
    IncomingJob,
    Job,
    JobFilter,
    JobHead,
    JobPace,
    JobType,
    Progress,
    can_move,
    can_report,
    parse_progress,
)
from ..errors import IllegalTransition, JobError
from ..events import DestChanged, Event, JobReceived
from ..util.parse import format_window, parse_window
from ..validate import clamp_time, clean_text, read_state
from .base import clamped
from .inventory import InventoryMixin
from .outbox import OutboxMixin

if TYPE_CHECKING:
    from protocol import Report

_DEST_COLS = "job, node, state, detail, updated, attempts, generation"
_JOB_COLS = "id, type, package, created, at, origin, manifest"
_HEAD_COLS = "id, type, package, created, at, origin"
_FINAL = tuple(sorted(FINAL_STATES))
_NOT_FINAL = f"NOT IN ({','.join('?' * len(_FINAL))})"
# Finished for good: final and not cancelled (a cancel must still travel down).
_DONE = tuple(sorted(FINAL_STATES - {DestState.CANCELLED}))
_NOT_DONE = f"NOT IN ({','.join('?' * len(_DONE))})"
_RESTARTABLE = tuple(sorted(RESTARTABLE))


class Applied(Enum):
    """What became of a report from below."""

    APPLIED = "applied"
    REPEAT = "repeat"  # not newer than what this origin already reported
    ILLEGAL = "illegal"  # a move the lifecycle table does not allow
    NO_DEST = "no destination"  # no such job or destination here


def new_job_id() -> str:
    import secrets  # here: hmac and OpenSSL's hashes, for the few commands that make jobs

    return "j" + secrets.token_hex(8)


# Rows are read through validate's clamps: a value stored before peer input
# was checked (a time of 1e300, a state "bogus") never breaks a listing.


def _job(r: tuple[str, str, str, float, float | None, str, bytes]) -> Job:
    return Job(r[0], JobType(r[1]), r[2], clamp_time(r[3]) or 0.0, clamp_time(r[4]), r[5], r[6])


def _head(r: tuple[str, str, str, float, float | None, str]) -> JobHead:
    return JobHead(r[0], JobType(r[1]), r[2], clamp_time(r[3]) or 0.0, clamp_time(r[4]), r[5])


def windows_text(pace: JobPace) -> str:
    """A job's windows as the ``jobs.windows`` column holds them."""
    return ",".join(format_window(w) for w in pace.windows)


def _pace(rate: float, windows: str) -> JobPace:
    return JobPace(float(rate), tuple(parse_window(w) for w in windows.split(",") if w))


#: A stored state by its text, as ``read_state`` reads it, for listings.
_STATES: dict[object, DestState] = {s.value: s for s in DestState}


def _dest(r: tuple[str, str, str, str, float, int, int]) -> Dest:
    return Dest(r[0], r[1], read_state(r[2]), r[3], clamp_time(r[4]) or 0.0, r[5], r[6])


class JobsMixin(OutboxMixin, InventoryMixin):
    # -- jobs ------------------------------------------------------------------

    def create_job(
        self,
        type_: JobType,
        package: str,
        nodes: list[str],
        envelope: bytes,
        at: float | None,
        origin: str,
        job_id: str | None = None,
        request_id: str | None = None,
        require: Callable[[], None] | None = None,
        pace: JobPace | None = None,
    ) -> str:
        """Record a new job and return its id.

        ``request_id`` is an idempotency key: if a job was already made with
        it, that job's id is returned and nothing is written, so a command
        repeated after a lost answer makes one job. The key is written in
        the same transaction as the job, so a crash leaves both or neither;
        reusing a key for another package or type is refused. ``require``
        runs inside the transaction, holding the write lock, to re-check
        what the job depends on (its package still being in the store)."""
        if not nodes:
            raise JobError("a job needs at least one destination")
        jid = job_id or new_job_id()
        now = time.time()
        with self._tx() as db:
            if request_id is not None:
                row = db.execute(
                    "SELECT j.id, j.type, j.package FROM requests r JOIN jobs j ON j.id = r.job "
                    "WHERE r.id=?",
                    (request_id,),
                ).fetchone()
                if row is not None:
                    if (row[1], row[2]) != (type_, package):
                        raise JobError(
                            f"request id {request_id!r} already made job {row[0]} "
                            f"({row[1]} {row[2]}); use a new request id for another job"
                        )
                    return str(row[0])
            if require is not None:
                require()
            db.execute(
                f"INSERT INTO jobs({_JOB_COLS}, announced) VALUES(?,?,?,?,?,?,?,0)",
                (jid, type_, package, now, at, origin, envelope),
            )
            if pace is not None and pace != JobPace():
                _store_pace(db, jid, pace)
            db.executemany(
                "INSERT INTO dests(job, node, state, updated) VALUES(?,?,?,?)",
                [(jid, n, DestState.WAITING, now) for n in nodes],
            )
            self._bump(db, jid)
            if request_id is not None:
                db.execute(
                    "INSERT OR REPLACE INTO requests(id, job, created) VALUES(?,?,?)",
                    (request_id, jid, now),
                )
        if self.listened:
            self._emit(self._moved(jid, n, package, None, DestState.WAITING, "") for n in nodes)
        return jid

    def _moved(
        self,
        jid: str,
        node: str,
        package: str | None,
        old: DestState | None,
        new: DestState,
        detail: str,
    ) -> DestChanged:
        return DestChanged(
            source=self.source,
            job=jid,
            node=node,
            package=package,
            old=old,
            new=new,
            detail=detail,
        )

    def package_users(self, package: str) -> list[str]:
        """Jobs for ``package`` with a destination not yet final."""
        return [
            r[0]
            for r in self._db.execute(
                "SELECT DISTINCT j.id FROM jobs j JOIN dests d ON d.job = j.id "
                f"WHERE j.package=? AND d.state {_NOT_FINAL} ORDER BY j.created, j.id",
                (package, *_FINAL),
            )
        ]

    def remove_unused_package(self, package: str, remove: Callable[[], None]) -> list[str]:
        """Run ``remove`` (which deletes the package's files) unless an
        unfinished job uses ``package``; return those jobs (empty when
        removed). The check and the removal happen under the database's
        write lock, so no job for the package can be made in between."""
        with self._tx():
            users = self.package_users(package)
            if not users:
                remove()
        return users

    def prune(self, finished_before: float, has_parent: bool) -> list[str]:
        """Delete jobs whose every destination is final and whose last
        change is older than ``finished_before``, with their destinations
        and request ids; return their ids. On a node with a parent, a job
        whose reports or announcement have not yet gone up is kept, so
        pruning never loses what the parent still has to hear."""
        with self._tx() as db:
            jids = [
                r[0]
                for r in db.execute(
                    "SELECT j.id FROM jobs j JOIN dests d ON d.job = j.id "
                    "WHERE j.announced = 1 OR ? = 0 "
                    "GROUP BY j.id "
                    f"HAVING SUM(d.state {_NOT_FINAL}) = 0 AND MAX(d.updated) < ? "
                    "AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job = j.id) "
                    "ORDER BY j.created, j.id",
                    (int(has_parent), *_FINAL, finished_before),
                )
            ]
            for chunk in range(0, len(jids), 500):
                part = jids[chunk : chunk + 500]
                marks = ",".join("?" * len(part))
                db.execute(f"DELETE FROM dests WHERE job IN ({marks})", part)
                db.execute(f"DELETE FROM requests WHERE job IN ({marks})", part)
                db.execute(f"DELETE FROM jobs WHERE id IN ({marks})", part)
        return jids

    def receive_job(self, job: IncomingJob, announced: bool = True) -> list[str]:
        """Record a job pushed by the parent (or, with ``announced`` false,
        announced from below, to be passed further up). Known destinations
        keep their state, so a repeated notice never restarts finished work;
        only a newer ``generation`` (``job retry`` upstream) puts them back
        to waiting. Returns the destinations that are new or reset."""
        now = time.time()
        events: list[Event] = []
        with self._tx() as db:
            fresh = db.execute(
                f"INSERT OR IGNORE INTO jobs({_JOB_COLS}, announced) VALUES(?,?,?,?,?,?,?,?)",
                (
                    job.id,
                    job.type,
                    job.package,
                    now,
                    job.at,
                    job.origin,
                    job.envelope,
                    int(announced),
                ),
            ).rowcount
            if fresh and job.pace != JobPace():
                _store_pace(db, job.id, job.pace)
            if fresh:
                events.append(
                    JobReceived(
                        source=self.source,
                        job=job.id,
                        job_type=job.type,
                        package=job.package,
                        destinations=tuple(job.destinations),
                    )
                )
            new = []
            for n in job.destinations:
                old: DestState | None = None
                cur = db.execute(
                    "INSERT OR IGNORE INTO dests(job, node, state, updated, generation) "
                    "VALUES(?,?,?,?,?)",
                    (job.id, n, DestState.WAITING, now, job.generation),
                )
                if not cur.rowcount:
                    row = db.execute(
                        "SELECT state FROM dests WHERE job=? AND node=?", (job.id, n)
                    ).fetchone()
                    old = read_state(row[0])
                    cur = db.execute(
                        "UPDATE dests SET state=?, detail='retry', updated=?, attempts=0, "
                        "generation=? WHERE job=? AND node=? AND generation < ? "
                        f"AND state IN ({','.join('?' * len(_RESTARTABLE))})",
                        (
                            DestState.WAITING,
                            now,
                            job.generation,
                            job.id,
                            n,
                            job.generation,
                            *_RESTARTABLE,
                        ),
                    )
                if cur.rowcount:
                    new.append(n)
                    detail = "" if old is None else "retry"
                    events.append(
                        self._moved(job.id, n, job.package, old, DestState.WAITING, detail)
                    )
            if fresh or new:
                self._bump(db, job.id)
        self._emit(events)
        return new

    def job(self, jid: str) -> Job | None:
        row = self._db.execute(f"SELECT {_JOB_COLS} FROM jobs WHERE id=?", (jid,)).fetchone()
        return _job(row) if row else None

    def jobs(self) -> list[Job]:
        return [
            _job(r) for r in self._db.execute(f"SELECT {_JOB_COLS} FROM jobs ORDER BY created, id")
        ]

    def job_summaries(
        self,
        state: JobFilter | None = None,
        since: float | None = None,
        limit: int | None = None,
    ) -> list[tuple[JobHead, dict[str, int]]]:
        """Jobs with their destination counts by state, filtered and limited
        in SQL (the newest ``limit`` jobs created at or after ``since``),
        oldest first. Two queries whatever the number of jobs, neither
        reading the jobs' envelopes."""
        where = {
            None: "",
            JobFilter.RUNNING: f"AND EXISTS (SELECT 1 FROM dests d WHERE d.job = j.id "
            f"AND d.state {_NOT_FINAL})",
            JobFilter.FAILED: "AND EXISTS (SELECT 1 FROM dests d WHERE d.job = j.id "
            "AND d.state = ?)",
            JobFilter.DONE: f"AND NOT EXISTS (SELECT 1 FROM dests d WHERE d.job = j.id "
            f"AND d.state {_NOT_FINAL})",
        }[state]
        params: list[Any] = [since if since is not None else float("-inf")]
        if state in (JobFilter.RUNNING, JobFilter.DONE):
            params.extend(_FINAL)
        elif state is JobFilter.FAILED:
            params.append(DestState.FAILED)
        params.append(-1 if limit is None else limit)
        chosen = (
            f"SELECT j.id FROM jobs j WHERE j.created >= ? {where} "
            "ORDER BY j.created DESC, j.id DESC LIMIT ?"
        )
        jobs = [
            _head(r)
            for r in self._db.execute(
                f"SELECT {_HEAD_COLS} FROM jobs WHERE id IN ({chosen}) ORDER BY created, id",
                params,
            )
        ]
        counts: dict[str, dict[str, int]] = {j.id: {} for j in jobs}
        for jid, st, n in self._db.execute(
            f"SELECT job, state, COUNT(*) FROM dests WHERE job IN ({chosen}) GROUP BY job, state",
            params,
        ):
            key = str(read_state(st))
            counts[jid][key] = counts[jid].get(key, 0) + n
        return [(j, counts[j.id]) for j in jobs]

    def progress(self, jid: str) -> dict[str, Progress]:
        """The last progress points of ``jid``'s transferring destinations."""
        return {
            r[0]: Progress(r[1], r[2], clamp_time(r[3]) or 0.0, r[4], clamp_time(r[5]))
            for r in self._db.execute(
                "SELECT p.node, p.done, p.total, p.time, p.prev_done, p.prev_time "
                "FROM progress p JOIN dests d ON d.job = p.job AND d.node = p.node "
                "WHERE p.job=? AND d.state=?",
                (jid, DestState.TRANSFERRING),
            )
        }

    def dest_listing(self, jid: str) -> list[tuple[str, DestState, str, float, Progress | None]]:
        """``jid``'s destinations by node, for a status listing: (node, state,
        detail, updated, the last progress points of a transferring one).
        Two queries (destinations with their times brought into range, and
        the few progress points: a join probed the progress table once per
        destination and cost more than both), and per row only a dictionary
        lookup for the state (as ``read_state`` reads it): a job to 10,000
        clients is 10,000 rows every time someone looks."""
        points = self.progress(jid)
        rows = self._db.execute(
            f"SELECT node, state, detail, {clamped('updated')} FROM dests "
            "WHERE job = ? ORDER BY node",
            (jid,),
        )
        failed = DestState.FAILED
        if not points:
            return [
                (node, _STATES.get(state, failed), detail, updated or 0.0, None)
                for node, state, detail, updated in rows
            ]
        return [
            (node, _STATES.get(state, failed), detail, updated or 0.0, points.get(node))
            for node, state, detail, updated in rows
        ]

    def unannounced(self) -> list[Job]:
        """Jobs our parent has not heard of: made here or announced from below."""
        return [
            _job(r)
            for r in self._db.execute(
                f"SELECT {_JOB_COLS} FROM jobs WHERE announced=0 ORDER BY created"
            )
        ]

    def mark_announced(self, jid: str) -> None:
        self._db.execute("UPDATE jobs SET announced=1 WHERE id=?", (jid,))

    def unfinished(self, jid: str) -> list[str]:
        """Destinations of ``jid`` that have not reached a final state."""
        return [d.node for d in self.dests(jid) if not d.final]

    def dests(self, jid: str) -> list[Dest]:
        return [
            _dest(r)
            for r in self._db.execute(
                f"SELECT {_DEST_COLS} FROM dests WHERE job=? ORDER BY node", (jid,)
            )
        ]

    def dest(self, jid: str, node: str) -> Dest | None:
        r = self._db.execute(
            f"SELECT {_DEST_COLS} FROM dests WHERE job=? AND node=?", (jid, node)
        ).fetchone()
        return _dest(r) if r else None

    def next_due(self, now: float) -> float | None:
        """The earliest future execution time among open jobs, for the timer.

        Every housekeeping pass asks, and a pass follows every batch of
        reports: the query starts from the few jobs with a future time (an
        index on ``jobs.at``) and looks for one open destination of each,
        instead of walking every destination of every job (with a job for
        10,000 nodes that walk was half the server's CPU under a fleet's
        reports)."""
        row = self._db.execute(
            "SELECT MIN(j.at) FROM jobs j WHERE j.at > ? AND EXISTS "
            f"(SELECT 1 FROM dests d WHERE d.job = j.id AND d.state {_NOT_FINAL})",
            (now, *_FINAL),
        ).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def offered(self, node: str, package: str, besides: str = "") -> bool:
        """Does a job other than ``besides`` offer ``package`` to ``node``
        (so the package must stay in the node's store)?"""
        row = self._db.execute(
            "SELECT 1 FROM dests d JOIN jobs j ON j.id = d.job "
            "WHERE d.node=? AND j.package=? AND d.state=? AND j.id != ? LIMIT 1",
            (node, package, DestState.OFFERED, besides),
        ).fetchone()
        return row is not None

    def reset_failed(self, jid: str) -> list[str]:
        """Put failed destinations back to waiting (``job retry``)."""
        with self._tx() as db:
            nodes = [
                r[0]
                for r in db.execute(
                    "SELECT node FROM dests WHERE job=? AND state=?", (jid, DestState.FAILED)
                )
            ]
            db.execute(
                "UPDATE dests SET state=?, detail='retry', updated=?, attempts=0, "
                "generation = generation + 1 WHERE job=? AND state=?",
                (DestState.WAITING, time.time(), jid, DestState.FAILED),
            )
            if nodes:
                self._bump(db, jid)
            pkg = db.execute("SELECT package FROM jobs WHERE id=?", (jid,)).fetchone()
        self._emit(
            self._moved(
                jid, n, pkg[0] if pkg else None, DestState.FAILED, DestState.WAITING, "retry"
            )
            for n in nodes
        )
        return nodes

    # -- what the parent half routes ---------------------------------------------
    #
    # Routing reads only what changed: each job-level change (a new job, a
    # retry, a cancel, a job received from the parent) stamps the job with a
    # new revision, and a pass asks for the jobs past the revision it saw
    # last. A child that connects gets its own subtree's open work by index.

    @staticmethod
    def _bump(db: sqlite3.Connection, jid: str) -> None:
        db.execute("INSERT OR IGNORE INTO meta VALUES('rev', 0)")
        db.execute("UPDATE meta SET value = value + 1 WHERE key='rev'")
        db.execute(
            "UPDATE jobs SET rev = (SELECT value FROM meta WHERE key='rev') WHERE id=?", (jid,)
        )

    def changed_jobs(self, since: int) -> tuple[list[str], int]:
        """Ids of jobs changed after revision ``since``, and the newest revision."""
        rows = self._db.execute(
            "SELECT id, rev FROM jobs WHERE rev > ? ORDER BY rev", (since,)
        ).fetchall()
        return [r[0] for r in rows], (rows[-1][1] if rows else since)

    def became_due(self, after: float, upto: float) -> list[str]:
        """Jobs whose execution time falls in ``(after, upto]``."""
        return [
            r[0]
            for r in self._db.execute(
                "SELECT id FROM jobs WHERE at > ? AND at <= ? ORDER BY at", (after, upto)
            )
        ]

    def job_pace(self, jid: str) -> JobPace:
        """A job's own rate and windows (none for an unknown job)."""
        row = self._db.execute("SELECT rate, windows FROM jobs WHERE id=?", (jid,)).fetchone()
        return _pace(row[0], row[1]) if row else JobPace()

    def package_rate(self, package: str) -> float:
        """The tightest rate of the unfinished jobs for ``package`` here (0:
        none has a rate): what a hop carrying the package is paced to."""
        row = self._db.execute(
            "SELECT MIN(j.rate) FROM jobs j WHERE j.package=? AND j.rate > 0 AND EXISTS("
            f"SELECT 1 FROM dests d WHERE d.job = j.id AND d.state {_NOT_FINAL})",
            (package, *_FINAL),
        ).fetchone()
        return float(row[0]) if row and row[0] is not None else 0.0

    def job_head(self, jid: str) -> JobHead | None:
        r = self._db.execute(f"SELECT {_HEAD_COLS} FROM jobs WHERE id=?", (jid,)).fetchone()
        return _head(r) if r else None

    def envelope(self, jid: str) -> bytes | None:
        """The signed envelope a job carries."""
        row = self._db.execute("SELECT manifest FROM jobs WHERE id=?", (jid,)).fetchone()
        return bytes(row[0]) if row else None

    def job_routes(self, jid: str) -> list[tuple[str, DestState, int, str | None]]:
        """Destinations of ``jid`` that are open or cancelled, with the child
        each is reached through: (node, state, generation, via)."""
        return [
            (r[0], read_state(r[1]), r[2], r[3])
            for r in self._db.execute(
                "SELECT d.node, d.state, d.generation, n.via FROM dests d "
                "LEFT JOIN nodes n ON n.name = d.node "
                f"WHERE d.job=? AND d.state {_NOT_DONE}",
                (jid, *_DONE),
            )
        ]

    def work_of(self, nodes: Iterable[str], now: float) -> list[tuple[str, str, DestState, int]]:
        """Open or cancelled destinations of due jobs for ``nodes``:
        (job, node, state, generation)."""
        names = list(nodes)
        out: list[tuple[str, str, DestState, int]] = []
        for i in range(0, len(names), 500):
            part = names[i : i + 500]
            out += [
                (r[0], r[1], read_state(r[2]), r[3])
                for r in self._db.execute(
                    "SELECT d.job, d.node, d.state, d.generation FROM dests d "
                    "JOIN jobs j ON j.id = d.job "
                    f"WHERE d.node IN ({','.join('?' * len(part))}) AND d.state {_NOT_DONE} "
                    "AND (j.at IS NULL OR j.at <= ?) ORDER BY j.created, d.node",
                    (*part, *_DONE, now),
                )
            ]
        return out

    def subtree_work(self, child: str, now: float) -> list[tuple[str, str, DestState, int]]:
        """``work_of`` the child and every node reached through it."""
        return self.work_of(
            [
                child,
                *(r[0] for r in self._db.execute("SELECT name FROM nodes WHERE via=?", (child,))),
            ],
            now,
        )

    def own_work(self, me: str, now: float, waiting_only: bool) -> list[tuple[Job, Dest]]:
        """This node's own unfinished destinations of due jobs, with their jobs."""
        rows = self._db.execute(
            f"SELECT {', '.join('j.' + c for c in _JOB_COLS.split(', '))}, "
            "d.job, d.node, d.state, d.detail, d.updated, d.attempts, d.generation "
            "FROM dests d JOIN jobs j ON j.id = d.job "
            f"WHERE d.node = ? AND d.state {_NOT_FINAL} AND (j.at IS NULL OR j.at <= ?) "
            "ORDER BY j.created",
            (me, *_FINAL, now),
        ).fetchall()
        work = [(_job(r[:7]), _dest(r[7:])) for r in rows]
        if waiting_only:
            work = [(j, d) for j, d in work if d.state is DestState.WAITING]
        return work

    # -- state changes and reports ---------------------------------------------

    def change(
        self,
        jid: str,
        node: str,
        state: DestState,
        detail: str,
        me: str,
        report: bool,
        package: str | None = None,
    ) -> Report | None:
        """A state change made here. With ``report`` the outbox row that
        carries it upward is written in the same transaction. Raises
        IllegalTransition (and changes nothing) for a move the lifecycle
        does not allow, such as progress after a cancel."""
        now = time.time()
        detail = clean_text(detail)
        rep: Report | None = None
        with self._tx() as db:
            row = db.execute(
                "SELECT d.state, j.package FROM dests d JOIN jobs j ON j.id = d.job "
                "WHERE d.job=? AND d.node=?",
                (jid, node),
            ).fetchone()
            if row is not None and not can_move(read_state(row[0]), state):
                raise IllegalTransition(f"{jid}/{node}: {row[0]} -> {state} is not allowed")
            seq = self._next_seq(db)
            db.execute(
                "UPDATE dests SET state=?, detail=?, updated=?, origin=?, seq=? "
                "WHERE job=? AND node=?",
                (state, detail, now, me, seq, jid, node),
            )
            if state is DestState.INSTALLED and package:
                self._record_installed(db, node, package, jid, now)
            if state is DestState.CANCELLED:
                self._bump(db, jid)  # the cancel must travel down
            _record_progress(db, jid, node, state, detail, now)
            if report:
                from protocol import Report  # not at the top: see outbox_after

                rep = Report(
                    report_id=f"{me}:{seq}",
                    job=jid,
                    node=node,
                    state=state,
                    seq=seq,
                    detail=detail,
                    package=package,
                    time=now,
                    origin=me,
                )
                self._enqueue(db, rep)
        if row is not None:
            self._emit(
                (self._moved(jid, node, package or row[1], read_state(row[0]), state, detail),)
            )
        return rep

    def apply_report(self, rep: Report, forward: bool) -> Applied:
        """Apply one report from below; see ``apply_reports``."""
        return self.apply_reports([rep], forward)[0]

    def apply_reports(self, reps: Sequence[Report], forward: bool) -> list[Applied]:
        """Apply reports from below in one transaction (one commit, one
        fsync, however many arrived together); with ``forward`` queue them
        for our parent in the same transaction. Each report's time is bounded
        by this node's clock plus ``CLOCK_SKEW``: a child whose clock runs
        ahead cannot put its future into ``updated`` or ``last_seen``."""
        outcomes: list[Applied] = []
        events: list[Event] = []
        with self._tx() as db:
            for rep in reps:
                outcome, event = self._apply_one(db, rep, forward)
                outcomes.append(outcome)
                if event is not None:
                    events.append(event)
        self._emit(events)
        return outcomes

    def _apply_one(
        self, db: sqlite3.Connection, rep: Report, forward: bool
    ) -> tuple[Applied, Event | None]:
        origin = rep.origin or rep.node
        now = time.time()
        # What is stored is bounded here too; what is forwarded is the report
        # as its origin signed it.
        at = min(rep.time or now, now + CLOCK_SKEW)
        detail = clean_text(rep.detail)
        try:
            new = DestState(rep.state)
        except ValueError:
            return Applied.ILLEGAL, None
        row = db.execute(
            "SELECT d.origin, d.seq, d.state, j.package FROM dests d "
            "JOIN jobs j ON j.id = d.job WHERE d.job=? AND d.node=?",
            (rep.job, rep.node),
        ).fetchone()
        if row is None:
            return Applied.NO_DEST, None
        if row[0] == origin and rep.seq <= row[1]:
            return Applied.REPEAT, None
        if not can_report(read_state(row[2]), new):
            return Applied.ILLEGAL, None
        db.execute(
            "UPDATE dests SET state=?, detail=?, updated=?, origin=?, seq=? WHERE job=? AND node=?",
            (new, detail, at, origin, rep.seq, rep.job, rep.node),
        )
        if new is DestState.INSTALLED and rep.package:
            self._record_installed(db, rep.node, rep.package, rep.job, at)
        _record_progress(db, rep.job, rep.node, new, detail, at)
        # A node behind a relay is never seen directly: its reports are
        # how we hear from it.
        db.execute(
            "UPDATE nodes SET last_seen = MAX(COALESCE(last_seen, 0), ?) WHERE name=?",
            (at, rep.node),
        )
        if forward:
            self._enqueue(db, rep)
        event = self._moved(
            rep.job, rep.node, rep.package or row[3], read_state(row[2]), new, detail
        )
        return Applied.APPLIED, event


def _record_progress(
    db: sqlite3.Connection, jid: str, node: str, state: DestState, detail: str, when: float
) -> None:
    """Keep the last two progress points of a transferring destination (the
    ``[bytes DONE/TOTAL]`` convention of protocol/SPEC.md); any other state,
    or a transfer that starts over, forgets them."""
    point = parse_progress(detail) if state is DestState.TRANSFERRING else None
    if point is None:
        db.execute("DELETE FROM progress WHERE job=? AND node=?", (jid, node))
        return
    done, total = point
    db.execute(
        "INSERT INTO progress(job, node, done, total, time) VALUES(?,?,?,?,?) "
        "ON CONFLICT(job, node) DO UPDATE SET prev_done=progress.done, "
        "prev_time=progress.time, done=excluded.done, total=excluded.total, "
        "time=excluded.time",
        (jid, node, done, total, when),
    )


def _store_pace(db: sqlite3.Connection, jid: str, pace: JobPace) -> None:
    db.execute("UPDATE jobs SET rate=?, windows=? WHERE id=?", (pace.rate, windows_text(pace), jid))
