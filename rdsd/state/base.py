"""The one SQLite connection a node's state lives behind, and its schema.

WAL mode with ``synchronous=FULL``: a committed state change survives a
crash, and admin commands in other processes can read while the daemon
writes. Every concern (jobs, outbox, nodes, inventory) is a mixin over this
connection, so a state change and the report that carries it upward commit
in one transaction.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..domain import DestState
from ..events import Event
from ..validate import MAX_DETAIL, TIME_CEILING

SCHEMA = """
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
CREATE TABLE IF NOT EXISTS requests(id TEXT PRIMARY KEY, job TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS progress(
    job TEXT NOT NULL, node TEXT NOT NULL, done INTEGER NOT NULL, total INTEGER NOT NULL,
    time REAL NOT NULL, prev_done INTEGER, prev_time REAL, PRIMARY KEY(job, node));
CREATE TABLE IF NOT EXISTS presence(
    name TEXT PRIMARY KEY, parent TEXT NOT NULL, software TEXT NOT NULL, through TEXT NOT NULL,
    online INTEGER NOT NULL, since REAL NOT NULL, seen REAL NOT NULL);
CREATE INDEX IF NOT EXISTS presence_through ON presence(through);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created);
CREATE INDEX IF NOT EXISTS dests_state ON dests(state);
CREATE INDEX IF NOT EXISTS dests_node ON dests(node, state);
CREATE INDEX IF NOT EXISTS jobs_package ON jobs(package);
CREATE INDEX IF NOT EXISTS jobs_at ON jobs(at);
CREATE INDEX IF NOT EXISTS nodes_via ON nodes(via);
"""

#: Columns added after the first release, for databases made before them.
MIGRATIONS = (
    ("jobs", "rev", "ALTER TABLE jobs ADD COLUMN rev INTEGER NOT NULL DEFAULT 0"),
    # Enrolment records the certificate issued (serial, public key); the
    # newest attach claim accepted for a node proves its route.
    ("nodes", "serial", "ALTER TABLE nodes ADD COLUMN serial TEXT"),
    ("nodes", "pubkey", "ALTER TABLE nodes ADD COLUMN pubkey BLOB"),
    ("nodes", "claim", "ALTER TABLE nodes ADD COLUMN claim BLOB"),
    ("nodes", "counter", "ALTER TABLE nodes ADD COLUMN counter INTEGER"),
    ("nodes", "parent", "ALTER TABLE nodes ADD COLUMN parent TEXT"),
    # A report from below keeps its origin's signature to be forwarded.
    ("outbox", "sig", "ALTER TABLE outbox ADD COLUMN sig BLOB"),
    # A job's own bandwidth limit (bytes/s, 0: none) and time windows
    # ("HH:MM-HH:MM" joined by commas, '': any time).
    ("jobs", "rate", "ALTER TABLE jobs ADD COLUMN rate REAL NOT NULL DEFAULT 0"),
    ("jobs", "windows", "ALTER TABLE jobs ADD COLUMN windows TEXT NOT NULL DEFAULT ''"),
)
LATE_INDEXES = "CREATE INDEX IF NOT EXISTS jobs_rev ON jobs(rev);"
#: Write-ahead-log pages after which a connection whose checkpoints are
#: made elsewhere (``defer_checkpoints``) still makes one itself: only if
#: the node's checkpointer has fallen that far behind (64 MiB of log).
DEFERRED_AUTOCHECKPOINT = 16384


def clamped(column: str) -> str:
    """SQL for ``validate.clamp_time`` of ``column``: NULL stays NULL, a
    number is brought into the years 1970 to 9999, anything else reads as
    0. Listings of thousands of rows do this in the query instead of once
    per value in Python."""
    bounded = f"MIN(MAX({column}, 0.0), {TIME_CEILING!r})"
    return (
        f"CASE typeof({column}) WHEN 'null' THEN NULL WHEN 'integer' THEN {bounded} "
        f"WHEN 'real' THEN {bounded} ELSE 0.0 END"
    )


class Database:
    """Owns the connection. Calls are short and local; the event loop may
    call them directly.

    ``listen`` attaches one event sink: after each commit that records a job
    or changes a destination, it is called with the typed events (in commit
    order, with no other database work in between), so a node can publish
    what happened without this layer knowing about nodes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.source = ""
        self._sink: Callable[[Event], None] | None = None
        self._checkpointer: sqlite3.Connection | None = None
        # Private whatever the umask (an embedder's process): SQLite gives its
        # WAL and shared-memory files the database file's mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        self._db = sqlite3.connect(path, timeout=10.0, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        for table, column, ddl in MIGRATIONS:
            columns = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in columns:
                self._db.execute(ddl)
        self._db.executescript(LATE_INDEXES)
        self._repair()
        # Report sequence numbers start from the clock (microseconds) when a
        # database is new, so a re-imaged node's reports are never taken for
        # repeats of its old ones, which had lower numbers.
        self._db.execute(
            "INSERT OR IGNORE INTO meta VALUES('seq', ?)", (int(time.time() * 1_000_000),)
        )

    def close(self) -> None:
        self._db.close()
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None

    def defer_checkpoints(self) -> None:
        """Leave copying the write-ahead log into the database to
        ``checkpoint``, called from a thread. SQLite otherwise makes a commit
        that takes the log past 1,000 pages do it, in the committing call:
        on a daemon's event loop that was the longest stall a relay had under
        a fleet's reports (0.7-1.4 s in one commit, ~0.1 s of it CPU, the
        rest writing and syncing the database file)."""
        self._db.execute(f"PRAGMA wal_autocheckpoint={DEFERRED_AUTOCHECKPOINT}")

    def checkpoint(self) -> tuple[int, int]:
        """Copy what the write-ahead log holds into the database, from any
        thread, with a connection of its own (one caller at a time). A
        PASSIVE checkpoint never waits for this node's writers nor holds
        them up; commits stay durable in the log whenever it runs. Returns
        (pages in the log, pages copied)."""
        conn = self._checkpointer
        if conn is None:
            conn = sqlite3.connect(
                self.path, timeout=0, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA synchronous=FULL")
            self._checkpointer = conn
        row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return int(row[1]), int(row[2])

    def _repair(self) -> None:
        """Once per database: bring values that versions before peer input
        was checked may have stored (a time of 1e300, a state ``bogus``, a
        megabyte of detail, a seq stored as a float) back into range, so no
        listing or later report trips over them. Routes believed without
        an attach claim are forgotten: the next claims prove them again."""
        if self._db.execute("SELECT 1 FROM meta WHERE key='repaired'").fetchone():
            return
        states = tuple(DestState)
        marks = ",".join("?" * len(states))
        ceiling, detail = TIME_CEILING, MAX_DETAIL
        with self._tx() as db:
            db.execute(
                f"UPDATE dests SET state=?, detail='an unknown state was reported' "
                f"WHERE state NOT IN ({marks})",
                (DestState.FAILED, *states),
            )
            for table, column in (
                ("dests", "updated"),
                ("nodes", "last_seen"),
                ("presence", "since"),
                ("presence", "seen"),
                ("jobs", "created"),
                ("jobs", "at"),
            ):
                db.execute(
                    f"UPDATE {table} SET {column} = MIN(MAX({column}, 0), ?) "
                    f"WHERE {column} < 0 OR {column} > ?",
                    (ceiling, ceiling),
                )
            db.execute(
                "UPDATE dests SET detail = substr(detail, 1, ?) WHERE length(detail) > ?",
                (detail, detail),
            )
            db.execute("UPDATE dests SET seq = 0 WHERE typeof(seq) != 'integer' OR seq < 0")
            db.execute("DELETE FROM holdings WHERE expires < 0 OR expires > ?", (ceiling,))
            db.execute("DELETE FROM progress WHERE time < 0 OR time > ? OR prev_time > ?",
                       (ceiling, ceiling))  # fmt: skip
            db.execute(
                "UPDATE nodes SET via = NULL WHERE claim IS NULL AND via IS NOT NULL "
                "AND via != name"
            )
            db.execute("INSERT OR REPLACE INTO meta VALUES('repaired', 1)")

    def listen(self, source: str, sink: Callable[[Event], None] | None) -> None:
        """Call ``sink`` with each event this connection's commits produce;
        ``source`` (the node's name) is their ``source``. None detaches.
        The sink runs on the thread that made the change and must not raise
        (``EventBus.publish`` never does)."""
        self.source = source
        self._sink = sink

    @property
    def listened(self) -> bool:
        """Is anyone listening? Writers skip building events otherwise."""
        return self._sink is not None

    def _emit(self, events: Iterable[Event]) -> None:
        """Hand committed changes to the sink, if any."""
        sink = self._sink
        if sink is not None:
            for event in events:
                sink(event)

    @contextmanager
    def _tx(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction. ``durable=False`` is for what the node rebuilds
        anyway after a restart (who is connected now): committed without
        waiting for the disk (``synchronous=NORMAL`` in WAL mode survives a
        crash of the process, not of the machine), since a relay taking a
        storm of reconnecting children spent a fifth of its time in those
        fsyncs."""
        if not durable:
            self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        finally:
            if not durable:
                self._db.execute("PRAGMA synchronous=FULL")

    def data_version(self) -> int:
        """Changes when another connection (a CLI command) commits."""
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])
