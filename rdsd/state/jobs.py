"""Jobs, their destinations, and every destination state change.

The two ways a state changes, here (``change``) or reported from below
(``apply_report``), both go through ``domain.can_move``: the lifecycle table
is enforced in this one place. A local change and the report that carries
it upward commit in one transaction; a report from below is applied only if
its ``seq`` is newer than the last one applied from the same origin, so
repeats and reordering change nothing.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from enum import Enum

from protocol import Report

from ..domain import (
    CLOCK_SKEW,
    FINAL_STATES,
    RESTARTABLE,
    Dest,
    DestState,
    IncomingJob,
    Job,
    JobType,
    can_move,
)
from ..errors import IllegalTransition, JobError
from .inventory import InventoryMixin
from .outbox import OutboxMixin

_DEST_COLS = "job, node, state, detail, updated, attempts, generation"
_JOB_COLS = "id, type, package, created, at, origin, manifest"
_FINAL = tuple(sorted(FINAL_STATES))
_NOT_FINAL = f"NOT IN ({','.join('?' * len(_FINAL))})"
_RESTARTABLE = tuple(sorted(RESTARTABLE))


class Applied(Enum):
    """What became of a report from below."""

    APPLIED = "applied"
    REPEAT = "repeat"  # not newer than what this origin already reported
    ILLEGAL = "illegal"  # a move the lifecycle table does not allow
    NO_DEST = "no destination"  # no such job or destination here


def new_job_id() -> str:
    return "j" + secrets.token_hex(8)


def _job(r: tuple[str, str, str, float, float | None, str, bytes]) -> Job:
    return Job(r[0], JobType(r[1]), r[2], r[3], r[4], r[5], r[6])


def _dest(r: tuple[str, str, str, str, float, int, int]) -> Dest:
    return Dest(r[0], r[1], DestState(r[2]), r[3], r[4], r[5], r[6])


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
    ) -> str:
        if not nodes:
            raise JobError("a job needs at least one destination")
        jid = job_id or new_job_id()
        now = time.time()
        with self._tx() as db:
            db.execute(
                f"INSERT INTO jobs({_JOB_COLS}, announced) VALUES(?,?,?,?,?,?,?,0)",
                (jid, type_, package, now, at, origin, envelope),
            )
            db.executemany(
                "INSERT INTO dests(job, node, state, updated) VALUES(?,?,?,?)",
                [(jid, n, DestState.WAITING, now) for n in nodes],
            )
        return jid

    def receive_job(self, job: IncomingJob, announced: bool = True) -> list[str]:
        """Record a job pushed by the parent (or, with ``announced`` false,
        announced from below, to be passed further up). Known destinations
        keep their state, so a repeated notice never restarts finished work;
        only a newer ``generation`` (``job retry`` upstream) puts them back
        to waiting. Returns the destinations that are new or reset."""
        now = time.time()
        with self._tx() as db:
            db.execute(
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
            )
            new = []
            for n in job.destinations:
                cur = db.execute(
                    "INSERT OR IGNORE INTO dests(job, node, state, updated, generation) "
                    "VALUES(?,?,?,?,?)",
                    (job.id, n, DestState.WAITING, now, job.generation),
                )
                if not cur.rowcount:
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
        return new

    def job(self, jid: str) -> Job | None:
        row = self._db.execute(f"SELECT {_JOB_COLS} FROM jobs WHERE id=?", (jid,)).fetchone()
        return _job(row) if row else None

    def jobs(self) -> list[Job]:
        return [
            _job(r) for r in self._db.execute(f"SELECT {_JOB_COLS} FROM jobs ORDER BY created, id")
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

    def cancelled(self) -> list[tuple[str, list[str]]]:
        """Cancelled destinations by job, to tell children that missed it."""
        out: dict[str, list[str]] = {}
        for jid, node in self._db.execute(
            "SELECT job, node FROM dests WHERE state=? ORDER BY job, node", (DestState.CANCELLED,)
        ):
            out.setdefault(jid, []).append(node)
        return list(out.items())

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

    def open_work(self, now: float | None = None) -> list[tuple[Job, Dest]]:
        """Destinations not yet final whose execution time has come."""
        now = time.time() if now is None else now
        rows = self._db.execute(
            f"SELECT {', '.join('j.' + c for c in _JOB_COLS.split(', '))}, "
            "d.job, d.node, d.state, d.detail, d.updated, d.attempts, d.generation "
            "FROM dests d JOIN jobs j ON j.id = d.job "
            f"WHERE d.state {_NOT_FINAL} AND (j.at IS NULL OR j.at <= ?) "
            "ORDER BY j.created, d.node",
            (*_FINAL, now),
        ).fetchall()
        return [(_job(r[:7]), _dest(r[7:])) for r in rows]

    def next_due(self, now: float) -> float | None:
        """The earliest future execution time among open jobs, for the timer."""
        row = self._db.execute(
            "SELECT MIN(j.at) FROM jobs j JOIN dests d ON d.job = j.id "
            f"WHERE j.at > ? AND d.state {_NOT_FINAL}",
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
        return nodes

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
        with self._tx() as db:
            row = db.execute(
                "SELECT state FROM dests WHERE job=? AND node=?", (jid, node)
            ).fetchone()
            if row is not None and not can_move(DestState(row[0]), state):
                raise IllegalTransition(f"{jid}/{node}: {row[0]} -> {state} is not allowed")
            seq = self._next_seq(db)
            db.execute(
                "UPDATE dests SET state=?, detail=?, updated=?, origin=?, seq=? "
                "WHERE job=? AND node=?",
                (state, detail, now, me, seq, jid, node),
            )
            if state is DestState.INSTALLED and package:
                self._record_installed(db, node, package, jid, now)
            if not report:
                return None
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
            return rep

    def apply_report(self, rep: Report, forward: bool) -> Applied:
        """Apply a report from below; with ``forward`` queue it for our parent
        in the same transaction. Its time is bounded by this node's clock
        plus ``CLOCK_SKEW``: a child whose clock runs ahead cannot put its
        future into ``updated`` or ``last_seen``."""
        origin = rep.origin or rep.node
        now = time.time()
        at = min(rep.time or now, now + CLOCK_SKEW)
        if at != rep.time:
            rep = dataclasses.replace(rep, time=at)
        try:
            new = DestState(rep.state)
        except ValueError:
            return Applied.ILLEGAL
        with self._tx() as db:
            row = db.execute(
                "SELECT origin, seq, state FROM dests WHERE job=? AND node=?", (rep.job, rep.node)
            ).fetchone()
            if row is None:
                return Applied.NO_DEST
            if row[0] == origin and rep.seq <= row[1]:
                return Applied.REPEAT
            if not can_move(DestState(row[2]), new):
                return Applied.ILLEGAL
            db.execute(
                "UPDATE dests SET state=?, detail=?, updated=?, origin=?, seq=? "
                "WHERE job=? AND node=?",
                (new, rep.detail, at, origin, rep.seq, rep.job, rep.node),
            )
            if new is DestState.INSTALLED and rep.package:
                self._record_installed(db, rep.node, rep.package, rep.job, at)
            # A node behind a relay is never seen directly: its reports are
            # how we hear from it.
            db.execute(
                "UPDATE nodes SET last_seen = MAX(COALESCE(last_seen, 0), ?) WHERE name=?",
                (at, rep.node),
            )
            if forward:
                self._enqueue(db, rep)
            return Applied.APPLIED
