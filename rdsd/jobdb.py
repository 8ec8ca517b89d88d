"""The job database: jobs, destination states, the report outbox, nodes,
groups and inventory, in SQLite (WAL) under the node's home.

Every node keeps one. On the server it is the truth for ``rdsd job status``;
on a relay it holds the jobs passing through and those created there; on a
client it remembers which jobs it has done, so a job never runs twice.

State changes are made in one transaction with the outbox row that reports
them upward, so a crash can lose neither. Each report carries a sequence
number from the node that made the change; a report whose number is not
newer than what is stored changes nothing, so repeats are harmless.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from protocol import Report

JOB_TYPES = ("install", "transfer", "offer")
FINAL_STATES = frozenset({"stored", "offered", "installed", "failed", "cancelled"})
STATES = ("waiting", "transferring", "installing", *sorted(FINAL_STATES))

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs(
    id TEXT PRIMARY KEY, type TEXT NOT NULL, package TEXT NOT NULL,
    created REAL NOT NULL, at REAL, origin TEXT NOT NULL, manifest BLOB NOT NULL,
    announced INTEGER NOT NULL DEFAULT 1);
CREATE TABLE IF NOT EXISTS dests(
    job TEXT NOT NULL, node TEXT NOT NULL, state TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '',
    updated REAL NOT NULL, origin TEXT NOT NULL DEFAULT '', seq INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0, generation INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY(job, node));
CREATE TABLE IF NOT EXISTS outbox(
    id INTEGER PRIMARY KEY AUTOINCREMENT, report_id TEXT UNIQUE NOT NULL, job TEXT NOT NULL,
    node TEXT NOT NULL, state TEXT NOT NULL, detail TEXT NOT NULL, seq INTEGER NOT NULL,
    origin TEXT NOT NULL, package TEXT, time REAL NOT NULL);
CREATE TABLE IF NOT EXISTS nodes(
    name TEXT PRIMARY KEY, role TEXT NOT NULL, via TEXT, last_seen REAL,
    revoked INTEGER NOT NULL DEFAULT 0, enrolled REAL);
CREATE TABLE IF NOT EXISTS groups(name TEXT NOT NULL, node TEXT NOT NULL, PRIMARY KEY(name, node));
CREATE TABLE IF NOT EXISTS holdings(
    node TEXT NOT NULL, package TEXT NOT NULL, expires REAL NOT NULL, PRIMARY KEY(node, package));
CREATE TABLE IF NOT EXISTS installed(
    node TEXT NOT NULL, package TEXT NOT NULL, job TEXT NOT NULL, time REAL NOT NULL,
    PRIMARY KEY(node, package));
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS dests_state ON dests(state);
CREATE INDEX IF NOT EXISTS jobs_package ON jobs(package);
CREATE INDEX IF NOT EXISTS nodes_via ON nodes(via);
"""


_DEST_COLS = "job, node, state, detail, updated, attempts, generation"
_JOB_COLS = "id, type, package, created, at, origin, manifest"


class JobError(Exception):
    """A job cannot be created or changed as asked; says why."""


@dataclass(frozen=True)
class Job:
    id: str
    type: str
    package: str
    created: float
    at: float | None
    origin: str
    manifest: bytes


@dataclass(frozen=True)
class Dest:
    job: str
    node: str
    state: str
    detail: str
    updated: float
    attempts: int
    generation: int

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


@dataclass(frozen=True)
class NodeRow:
    name: str
    role: str
    via: str | None
    last_seen: float | None
    revoked: bool


def new_job_id() -> str:
    return "j" + secrets.token_hex(8)


class JobDB:
    """A thin typed layer over one SQLite connection. Calls are short and
    local; the event loop may call them directly."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, timeout=10.0, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def data_version(self) -> int:
        """Changes when another connection (a CLI command) commits."""
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    # -- jobs ------------------------------------------------------------------

    def expand(self, destinations: Iterable[str]) -> list[str]:
        """Node names from names and ``group:NAME``; unknown groups refused."""
        out: list[str] = []
        for dest in destinations:
            if dest.startswith("group:"):
                members = self.group_members(dest[6:])
                if not members:
                    raise JobError(f"group {dest[6:]!r} has no members")
                out.extend(members)
            else:
                out.append(dest)
        return list(dict.fromkeys(out))

    def create_job(
        self,
        type_: str,
        package: str,
        nodes: list[str],
        envelope: bytes,
        at: float | None,
        origin: str,
        job_id: str | None = None,
    ) -> str:
        if type_ not in JOB_TYPES:
            raise JobError(f"job type {type_!r} is not one of {', '.join(JOB_TYPES)}")
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
                "INSERT INTO dests(job, node, state, updated) VALUES(?,?, 'waiting', ?)",
                [(jid, n, now) for n in nodes],
            )
        return jid

    def receive_job(
        self,
        jid: str,
        type_: str,
        package: str,
        nodes: list[str],
        envelope: bytes,
        at: float | None,
        origin: str,
        generation: int = 0,
        announced: bool = True,
    ) -> list[str]:
        """Record a job pushed by the parent (or, with ``announced`` false,
        announced from below, to be passed further up). Known destinations
        keep their state, so a repeated notice never restarts finished work;
        only a newer ``generation`` (``job retry`` upstream) puts them back
        to waiting. Returns the destinations that are new or reset."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                f"INSERT OR IGNORE INTO jobs({_JOB_COLS}, announced) VALUES(?,?,?,?,?,?,?,?)",
                (jid, type_, package, now, at, origin, envelope, int(announced)),
            )
            new = []
            for n in nodes:
                cur = db.execute(
                    "INSERT OR IGNORE INTO dests(job, node, state, updated, generation) "
                    "VALUES(?,?,'waiting',?,?)",
                    (jid, n, now, generation),
                )
                if not cur.rowcount:
                    cur = db.execute(
                        "UPDATE dests SET state='waiting', detail='retry', updated=?, attempts=0, "
                        "generation=? WHERE job=? AND node=? AND generation < ?",
                        (now, generation, jid, n, generation),
                    )
                if cur.rowcount:
                    new.append(n)
        return new

    def job(self, jid: str) -> Job | None:
        row = self._db.execute(f"SELECT {_JOB_COLS} FROM jobs WHERE id=?", (jid,)).fetchone()
        return Job(*row) if row else None

    def jobs(self) -> list[Job]:
        return [
            Job(*r) for r in self._db.execute(f"SELECT {_JOB_COLS} FROM jobs ORDER BY created, id")
        ]

    def unannounced(self) -> list[Job]:
        """Jobs our parent has not heard of: made here or announced from below."""
        return [
            Job(*r)
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
            "SELECT job, node FROM dests WHERE state='cancelled' ORDER BY job, node"
        ):
            out.setdefault(jid, []).append(node)
        return list(out.items())

    def dests(self, jid: str) -> list[Dest]:
        return [
            Dest(*r)
            for r in self._db.execute(
                f"SELECT {_DEST_COLS} FROM dests WHERE job=? ORDER BY node",
                (jid,),
            )
        ]

    def dest(self, jid: str, node: str) -> Dest | None:
        r = self._db.execute(
            f"SELECT {_DEST_COLS} FROM dests WHERE job=? AND node=?",
            (jid, node),
        ).fetchone()
        return Dest(*r) if r else None

    def open_work(self, now: float | None = None) -> list[tuple[Job, Dest]]:
        """Destinations not yet final whose execution time has come."""
        now = time.time() if now is None else now
        rows = self._db.execute(
            f"SELECT {', '.join('j.' + c for c in _JOB_COLS.split(', '))}, "
            "d.job, d.node, d.state, d.detail, d.updated, d.attempts, d.generation "
            "FROM dests d JOIN jobs j ON j.id = d.job "
            f"WHERE d.state NOT IN ({','.join('?' * len(FINAL_STATES))}) "
            "AND (j.at IS NULL OR j.at <= ?) ORDER BY j.created, d.node",
            (*sorted(FINAL_STATES), now),
        ).fetchall()
        return [(Job(*r[:7]), Dest(*r[7:])) for r in rows]

    def next_due(self, now: float) -> float | None:
        """The earliest future execution time among open jobs, for the timer."""
        row = self._db.execute(
            "SELECT MIN(j.at) FROM jobs j JOIN dests d ON d.job = j.id "
            f"WHERE j.at > ? AND d.state NOT IN ({','.join('?' * len(FINAL_STATES))})",
            (now, *sorted(FINAL_STATES)),
        ).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    # -- state changes and reports ----------------------------------------------

    def _next_seq(self, db: sqlite3.Connection) -> int:
        db.execute("INSERT OR IGNORE INTO meta VALUES('seq', 0)")
        db.execute("UPDATE meta SET value = value + 1 WHERE key='seq'")
        return int(db.execute("SELECT value FROM meta WHERE key='seq'").fetchone()[0])

    def change(
        self,
        jid: str,
        node: str,
        state: str,
        detail: str,
        me: str,
        report: bool,
        package: str | None = None,
    ) -> Report | None:
        """A state change made here. With ``report`` the outbox row that
        carries it upward is written in the same transaction."""
        now = time.time()
        with self._tx() as db:
            seq = self._next_seq(db)
            db.execute(
                "UPDATE dests SET state=?, detail=?, updated=?, origin=?, seq=? "
                "WHERE job=? AND node=?",
                (state, detail, now, me, seq, jid, node),
            )
            if state == "installed" and package:
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

    def apply_report(self, rep: Report, forward: bool) -> bool:
        """Apply a report from below; with ``forward`` queue it for our parent
        in the same transaction. Returns False if it changed nothing."""
        origin = rep.origin or rep.node
        with self._tx() as db:
            row = db.execute(
                "SELECT origin, seq, state FROM dests WHERE job=? AND node=?", (rep.job, rep.node)
            ).fetchone()
            if row is None:
                return False
            if row[0] == origin and rep.seq <= row[1]:
                return False
            if row[2] == "cancelled" and rep.state not in FINAL_STATES:
                return False  # a late progress report does not reopen a cancel
            db.execute(
                "UPDATE dests SET state=?, detail=?, updated=?, origin=?, seq=? "
                "WHERE job=? AND node=?",
                (
                    rep.state,
                    rep.detail,
                    rep.time or time.time(),
                    origin,
                    rep.seq,
                    rep.job,
                    rep.node,
                ),
            )
            if rep.state == "installed" and rep.package:
                self._record_installed(db, rep.node, rep.package, rep.job, rep.time)
            # A node behind a relay is never seen directly: its reports are
            # how we hear from it.
            db.execute(
                "UPDATE nodes SET last_seen = MAX(COALESCE(last_seen, 0), ?) WHERE name=?",
                (rep.time or time.time(), rep.node),
            )
            if forward:
                self._enqueue(db, rep)
            return True

    @staticmethod
    def _record_installed(
        db: sqlite3.Connection, node: str, package: str, jid: str, when: float
    ) -> None:
        db.execute("INSERT OR REPLACE INTO installed VALUES(?,?,?,?)", (node, package, jid, when))

    @staticmethod
    def _enqueue(db: sqlite3.Connection, rep: Report) -> None:
        db.execute(
            "INSERT OR IGNORE INTO outbox(report_id, job, node, state, detail, seq, origin, "
            "package, time) VALUES(?,?,?,?,?,?,?,?,?)",
            (
                rep.report_id,
                rep.job,
                rep.node,
                rep.state,
                rep.detail,
                rep.seq,
                rep.origin or rep.node,
                rep.package,
                rep.time,
            ),
        )

    def outbox(self) -> list[Report]:
        return [
            Report(
                report_id=r[0],
                job=r[1],
                node=r[2],
                state=r[3],
                detail=r[4],
                seq=r[5],
                origin=r[6],
                package=r[7],
                time=r[8],
            )
            for r in self._db.execute(
                "SELECT report_id, job, node, state, detail, seq, origin, package, time "
                "FROM outbox ORDER BY id"
            )
        ]

    def ack(self, report_id: str) -> None:
        self._db.execute("DELETE FROM outbox WHERE report_id=?", (report_id,))

    def reset_failed(self, jid: str) -> list[str]:
        """Put failed destinations back to waiting (``job retry``)."""
        with self._tx() as db:
            nodes = [
                r[0]
                for r in db.execute("SELECT node FROM dests WHERE job=? AND state='failed'", (jid,))
            ]
            db.execute(
                "UPDATE dests SET state='waiting', detail='retry', updated=?, attempts=0, "
                "generation = generation + 1 WHERE job=? AND state='failed'",
                (time.time(), jid),
            )
        return nodes

    # -- nodes, routes, groups ---------------------------------------------------

    def upsert_node(self, name: str, role: str, via: str | None) -> None:
        """A node just connected to us directly (``via`` is itself)."""
        self._db.execute(
            "INSERT INTO nodes(name, role, via, last_seen) VALUES(?,?,?,?) "
            "ON CONFLICT(name) DO UPDATE SET role=excluded.role, via=excluded.via, "
            "last_seen=excluded.last_seen",
            (name, role, via, time.time()),
        )

    def enroll(self, name: str, role: str) -> None:
        self._db.execute(
            "INSERT INTO nodes(name, role, enrolled) VALUES(?,?,?) "
            "ON CONFLICT(name) DO UPDATE SET role=excluded.role, enrolled=excluded.enrolled",
            (name, role, time.time()),
        )

    def node(self, name: str) -> NodeRow | None:
        r = self._db.execute(
            "SELECT name, role, via, last_seen, revoked FROM nodes WHERE name=?", (name,)
        ).fetchone()
        return NodeRow(r[0], r[1], r[2], r[3], bool(r[4])) if r else None

    def nodes(self) -> list[NodeRow]:
        return [
            NodeRow(r[0], r[1], r[2], r[3], bool(r[4]))
            for r in self._db.execute(
                "SELECT name, role, via, last_seen, revoked FROM nodes ORDER BY name"
            )
        ]

    def revoke(self, name: str) -> bool:
        cur = self._db.execute("UPDATE nodes SET revoked=1 WHERE name=?", (name,))
        return cur.rowcount > 0

    def may_fetch(self, package: str, child: str) -> bool:
        """Is some job for ``package`` addressed to ``child`` or to a node
        reached through it?"""
        row = self._db.execute(
            "SELECT 1 FROM jobs j JOIN dests d ON d.job = j.id "
            "LEFT JOIN nodes n ON n.name = d.node "
            "WHERE j.package = ? AND (d.node = ? OR n.via = ?) "
            "AND (j.at IS NULL OR j.at <= ?) AND d.state NOT IN ('cancelled', 'failed') LIMIT 1",
            (package, child, child, time.time()),
        ).fetchone()
        return row is not None

    def routes(self) -> dict[str, str | None]:
        """Every known node and the child it is reached through."""
        return dict(self._db.execute("SELECT name, via FROM nodes"))

    def node_index(self) -> dict[str, tuple[str, str | None, bool]]:
        """Every known node: name to (role, via, revoked), in one query."""
        return {
            r[0]: (r[1], r[2], bool(r[3]))
            for r in self._db.execute("SELECT name, role, via, revoked FROM nodes")
        }

    def route_through(self, via: str, nodes: list[tuple[str, str]], keep: set[str]) -> None:
        """Route ``nodes`` (name, role) through ``via`` and forget routes
        through it for nodes not in ``keep``, in one transaction."""
        with self._tx() as db:
            db.executemany(
                "INSERT INTO nodes(name, role, via) VALUES(?,?,?) "
                "ON CONFLICT(name) DO UPDATE SET role=excluded.role, via=excluded.via",
                [(name, role, via) for name, role in nodes],
            )
            gone = [
                (n,)
                for (n,) in db.execute("SELECT name FROM nodes WHERE via=?", (via,))
                if n not in keep
            ]
            db.executemany("UPDATE nodes SET via=NULL WHERE name=?", gone)

    def revoked(self) -> list[str]:
        return [
            r[0] for r in self._db.execute("SELECT name FROM nodes WHERE revoked=1 ORDER BY name")
        ]

    def set_revoked(self, names: list[str]) -> None:
        """Take the parent's list of revoked nodes as the whole truth."""
        with self._tx() as db:
            db.execute("UPDATE nodes SET revoked=0")
            db.executemany(
                "INSERT INTO nodes(name, role, revoked) VALUES(?, 'unknown', 1) "
                "ON CONFLICT(name) DO UPDATE SET revoked=1",
                [(n,) for n in names],
            )

    def add_group(self, name: str, members: list[str]) -> None:
        with self._tx() as db:
            db.executemany("INSERT OR IGNORE INTO groups VALUES(?,?)", [(name, m) for m in members])

    def group_members(self, name: str) -> list[str]:
        return [
            r[0]
            for r in self._db.execute("SELECT node FROM groups WHERE name=? ORDER BY node", (name,))
        ]

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, node in self._db.execute("SELECT name, node FROM groups ORDER BY name, node"):
            out.setdefault(name, []).append(node)
        return out

    # -- inventory -----------------------------------------------------------------

    def set_holdings(self, node: str, packages: dict[str, float]) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM holdings WHERE node=?", (node,))
            db.executemany(
                "INSERT INTO holdings VALUES(?,?,?)", [(node, p, e) for p, e in packages.items()]
            )

    def holdings(self, node: str | None = None) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        q = "SELECT node, package, expires FROM holdings"
        rows = self._db.execute(q + " WHERE node=?", (node,)) if node else self._db.execute(q)
        for n, p, e in rows:
            out.setdefault(n, {})[p] = e
        return out

    def installed(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for n, p in self._db.execute("SELECT node, package FROM installed ORDER BY node, package"):
            out.setdefault(n, []).append(p)
        return out
