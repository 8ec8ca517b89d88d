"""Nodes, the routes to them, revocations and groups.

A node's ``via`` is the child session it is reached through: itself for a
direct child, the relay for a node behind one. Routes come from sessions and
from relays' TOPOLOGY, never from what a job says.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

from ..domain import DestState, NodeClaim, NodeRow, PresenceRow
from ..errors import JobError
from ..validate import clamp_time
from .base import Database, clamped

_NODE_COLS = "name, role, via, last_seen, revoked"
_CLAIM_COLS = "name, role, via, revoked, pubkey, claim, counter, parent"
#: A row of ``node_listing``.
NodeListing = tuple[
    str, str, str | None, float | None, bool, tuple[bool, str, str, float, float] | None
]


def _row(r: tuple[str, str, str | None, float | None, int]) -> NodeRow:
    return NodeRow(r[0], r[1], r[2], clamp_time(r[3]), bool(r[4]))


def _claim_row(r: tuple[object, ...]) -> NodeClaim:
    pubkey, claim = r[4], r[5]
    return NodeClaim(
        str(r[0]),
        str(r[1]),
        r[2] if isinstance(r[2], str) else None,
        bool(r[3]),
        bytes(pubkey) if isinstance(pubkey, bytes) else None,
        bytes(claim) if isinstance(claim, bytes) else None,
        r[6] if isinstance(r[6], int) else None,
        r[7] if isinstance(r[7], str) else None,
    )


class NodesMixin(Database):
    def upsert_node(
        self,
        name: str,
        role: str,
        via: str | None,
        claim: tuple[bytes, int, str] | None = None,
        create: bool = True,
    ) -> None:
        """A node just connected to us directly (``via`` is itself), with its
        attach claim (raw, counter, parent) once checked. Without ``create``
        (the server) a node that has no row is not made: only enrolment
        makes nodes there."""
        raw, counter, parent = claim if claim is not None else (None, None, None)
        if not create:
            # The server: the newest claim it accepted is what later claims
            # about the node are judged against, so it is kept durably.
            self._db.execute(
                "UPDATE nodes SET via=?, last_seen=?, claim=COALESCE(?, claim), "
                "counter=COALESCE(?, counter), parent=COALESCE(?, parent) WHERE name=?",
                (via, time.time(), raw, counter, parent, name),
            )
            return
        # A relay, without waiting for the disk: the server judges every
        # claim a relay passes up, and a relay whose machine crashes loses its
        # children's sessions too, each reconnecting with a new claim. A
        # relay taking a storm of thousands paid an fsync for each.
        with self._tx(durable=False) as db:
            db.execute(
                "INSERT INTO nodes(name, role, via, last_seen, claim, counter, parent) "
                "VALUES(?,?,?,?,?,?,?) "
                "ON CONFLICT(name) DO UPDATE SET role=excluded.role, via=excluded.via, "
                "last_seen=excluded.last_seen, claim=COALESCE(excluded.claim, claim), "
                "counter=COALESCE(excluded.counter, counter), "
                "parent=COALESCE(excluded.parent, parent)",
                (name, role, via, time.time(), raw, counter, parent),
            )

    def enroll(
        self, name: str, role: str, serial: int | None = None, pubkey: bytes | None = None
    ) -> None:
        """Record a node the server issued a certificate to: the allow-list.
        A new certificate (a lost bundle re-issued) replaces the old one,
        which is refused from then on, and forgets claims made with the old
        key."""
        self._db.execute(
            "INSERT INTO nodes(name, role, enrolled, serial, pubkey) VALUES(?,?,?,?,?) "
            "ON CONFLICT(name) DO UPDATE SET role=excluded.role, enrolled=excluded.enrolled, "
            "serial=excluded.serial, pubkey=excluded.pubkey, claim=NULL, counter=NULL, "
            "parent=NULL, via=NULL",
            (name, role, time.time(), None if serial is None else str(serial), pubkey),
        )

    def enrolment(self, name: str) -> tuple[bool, str | None] | None:
        """``(enrolled, serial)`` of ``name``, None if there is no such row.
        ``serial`` is None for a node enrolled before serials were kept."""
        r = self._db.execute("SELECT enrolled, serial FROM nodes WHERE name=?", (name,)).fetchone()
        return None if r is None else (r[0] is not None, r[1])

    def adopt_certificate(self, name: str, serial: int, pubkey: bytes) -> None:
        """A node enrolled before serials and keys were recorded shows its
        certificate for the first time: record it as the one issued."""
        self._db.execute(
            "UPDATE nodes SET serial=?, pubkey=? WHERE name=? AND serial IS NULL",
            (str(serial), pubkey, name),
        )

    def _rows_named(self, select: str, names: Iterable[str]) -> Iterator[tuple[Any, ...]]:
        """The rows of ``select``, which ends in ``name IN``, for ``names``:
        500 at a time, within SQLite's bound on parameters."""
        wanted = list(names)
        for i in range(0, len(wanted), 500):
            part = wanted[i : i + 500]
            yield from self._db.execute(f"{select} ({','.join('?' * len(part))})", part)

    def claim_index(self, names: Iterable[str]) -> dict[str, NodeClaim]:
        """What is known of ``names`` for judging claims about them."""
        select = f"SELECT {_CLAIM_COLS} FROM nodes WHERE name IN"
        return {r[0]: _claim_row(r) for r in self._rows_named(select, names)}

    def subtree_claims(self, me: str) -> dict[str, tuple[bytes, str | None]]:
        """Every node routed through a child of ``me`` with its attach claim
        and the parent it names (a relay's TOPOLOGY snapshot)."""
        return {
            r[0]: (bytes(r[1]), r[2])
            for r in self._db.execute(
                "SELECT name, claim, parent FROM nodes WHERE via IS NOT NULL AND revoked=0 "
                "AND claim IS NOT NULL AND name != ?",
                (me,),
            )
        }

    def next_claim_counter(self) -> int:
        """The counter of this node's next attach claim: greater than every
        earlier one (it is kept here) and at least the clock in
        microseconds, so a database restored from a backup still counts
        past what it said since."""
        now_us = int(time.time() * 1_000_000)
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO meta VALUES('claim', 0)")
            db.execute("UPDATE meta SET value = MAX(value + 1, ?) WHERE key='claim'", (now_us,))
            return int(db.execute("SELECT value FROM meta WHERE key='claim'").fetchone()[0])

    def node(self, name: str) -> NodeRow | None:
        r = self._db.execute(f"SELECT {_NODE_COLS} FROM nodes WHERE name=?", (name,)).fetchone()
        return _row(r) if r else None

    def nodes(self) -> list[NodeRow]:
        return [_row(r) for r in self._db.execute(f"SELECT {_NODE_COLS} FROM nodes ORDER BY name")]

    def revoke(self, name: str) -> bool:
        cur = self._db.execute("UPDATE nodes SET revoked=1 WHERE name=?", (name,))
        return cur.rowcount > 0

    def may_fetch(self, package: str, child: str) -> bool:
        """Is some job for ``package`` addressed to ``child`` or to a node
        reached through it? Asked on every fetch, so each part is an
        index lookup that stops at the first match (the job's destination
        row by its key; the child's nodes by ``nodes_via``), not a scan of
        every destination of the package's jobs."""
        closed = (DestState.CANCELLED, DestState.FAILED)
        row = self._db.execute(
            "SELECT 1 FROM jobs j WHERE j.package = ? AND (j.at IS NULL OR j.at <= ?) AND ("
            " EXISTS (SELECT 1 FROM dests d WHERE d.job = j.id AND d.node = ?"
            "  AND d.state NOT IN (?, ?))"
            " OR EXISTS (SELECT 1 FROM nodes n CROSS JOIN dests d"
            "  ON d.job = j.id AND d.node = n.name WHERE n.via = ? AND d.state NOT IN (?, ?))"
            ") LIMIT 1",
            (package, time.time(), child, *closed, child, *closed),
        ).fetchone()
        return row is not None

    def node_index(self) -> dict[str, tuple[str, str | None, bool]]:
        """Every known node: name to (role, via, revoked), in one query."""
        return {
            r[0]: (r[1], r[2], bool(r[3]))
            for r in self._db.execute("SELECT name, role, via, revoked FROM nodes")
        }

    def route_through(
        self,
        via: str,
        nodes: list[tuple[str, str, bytes, int, str]],
        keep: set[str] | None,
        removed: Iterable[str] = (),
        create: bool = True,
    ) -> None:
        """Route ``nodes`` (name, role, attach claim, its counter, the parent
        it names) through ``via``; with ``keep``, forget routes through it
        for nodes not in ``keep`` (a whole subtree replaced); forget the
        routes of ``removed`` that go through it. Without ``create`` (the
        server) only nodes that have a row are routed. One transaction."""
        with self._tx() as db:
            if create:
                db.executemany(
                    "INSERT INTO nodes(name, role, via, claim, counter, parent) "
                    "VALUES(?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET role=excluded.role, "
                    "via=excluded.via, claim=excluded.claim, counter=excluded.counter, "
                    "parent=excluded.parent",
                    [(name, role, via, raw, n, p) for name, role, raw, n, p in nodes],
                )
            else:
                db.executemany(
                    "UPDATE nodes SET via=?, claim=?, counter=?, parent=? WHERE name=?",
                    [(via, raw, n, p, name) for name, _, raw, n, p in nodes],
                )
            if keep is not None:
                gone = [
                    (n,)
                    for (n,) in db.execute("SELECT name FROM nodes WHERE via=?", (via,))
                    if n not in keep
                ]
                db.executemany("UPDATE nodes SET via=NULL WHERE name=?", gone)
            db.executemany(
                "UPDATE nodes SET via=NULL WHERE name=? AND via=?", [(n, via) for n in removed]
            )

    def node_index_of(self, names: Iterable[str]) -> dict[str, tuple[str, str | None, bool]]:
        """``node_index`` for just ``names``."""
        select = "SELECT name, role, via, revoked FROM nodes WHERE name IN"
        return {r[0]: (r[1], r[2], bool(r[3])) for r in self._rows_named(select, names)}

    # -- presence: who is connected now ------------------------------------------

    def presence_clear(self) -> None:
        """Nothing is connected to a parent half that has just started."""
        self._db.execute("UPDATE presence SET online=0 WHERE online=1")

    def presence_online(self, through: str, entries: dict[str, tuple[str, str]]) -> None:
        """Nodes ``name -> (parent, software)`` are connected now; the news
        came over the child session ``through``."""
        now = time.time()
        with self._tx(durable=False) as db:  # presence is rebuilt at start
            db.executemany(
                "INSERT INTO presence(name, parent, software, through, online, since, seen) "
                "VALUES(?,?,?,?,1,?,?) ON CONFLICT(name) DO UPDATE SET parent=excluded.parent, "
                "software=excluded.software, through=excluded.through, online=1, "
                "since=excluded.since, seen=excluded.seen",
                [(n, p, sw, through, now, now) for n, (p, sw) in entries.items()],
            )
            db.executemany("UPDATE nodes SET last_seen=? WHERE name=?", [(now, n) for n in entries])

    def presence_offline(self, through: str, names: Iterable[str] | None = None) -> list[str]:
        """Nodes that went away, among those known online through ``through``
        (all of them when ``names`` is None, except ``through`` itself unless
        asked). Returns the names that were online."""
        now = time.time()
        with self._tx(durable=False) as db:  # presence is rebuilt at start
            online = [
                r[0]
                for r in db.execute(
                    "SELECT name FROM presence WHERE through=? AND online=1", (through,)
                )
            ]
            gone = online if names is None else sorted(set(online) & set(names))
            db.executemany(
                "UPDATE presence SET online=0, seen=? WHERE name=?", [(now, n) for n in gone]
            )
            db.executemany("UPDATE nodes SET last_seen=? WHERE name=?", [(now, n) for n in gone])
        return gone

    def node_listing(self) -> list[NodeListing]:
        """Every known node by name with what ``rdsd nodes`` shows of it, in
        one query with the times brought into range by it: (name, role,
        via, last seen, revoked, presence) where presence, None when there
        is no news of the node, is (online, parent, software, since, seen).
        Tuples, not records: this is 10,000 rows at fleet size."""
        return [
            (
                r[0],
                r[1],
                r[2],
                r[3],
                bool(r[4]),
                None if r[5] is None else (bool(r[6]), r[5], r[7], r[8] or 0.0, r[9] or 0.0),
            )
            for r in self._db.execute(
                f"SELECT n.name, n.role, n.via, {clamped('n.last_seen')}, n.revoked, "
                f"p.parent, p.online, p.software, {clamped('p.since')}, {clamped('p.seen')} "
                "FROM nodes n LEFT JOIN presence p ON p.name = n.name ORDER BY n.name"
            )
        ]

    def presence(self) -> dict[str, PresenceRow]:
        return {
            r[0]: PresenceRow(
                r[0], r[1], r[2], r[3], bool(r[4]), clamp_time(r[5]) or 0.0, clamp_time(r[6]) or 0.0
            )
            for r in self._db.execute(
                "SELECT name, parent, software, through, online, since, seen FROM presence"
            )
        }

    def online_through(self, through: str) -> list[str]:
        """Nodes known connected over the child session ``through``."""
        return [
            r[0]
            for r in self._db.execute(
                "SELECT name FROM presence WHERE through=? AND online=1", (through,)
            )
        ]

    def online_of(self, names: Iterable[str]) -> dict[str, tuple[str, str]]:
        """Those of ``names`` connected now: name to (parent, software)."""
        select = "SELECT name, parent, software FROM presence WHERE online=1 AND name IN"
        return {r[0]: (r[1], r[2]) for r in self._rows_named(select, names)}

    def online(self) -> dict[str, tuple[str, str]]:
        """Every node connected now: name to (parent, software)."""
        return {
            r[0]: (r[1], r[2])
            for r in self._db.execute("SELECT name, parent, software FROM presence WHERE online=1")
        }

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

    def remove_group(self, name: str, members: list[str] | None = None) -> list[str]:
        """Take ``members`` out of group ``name`` (all of them when None);
        return the members removed. A group is its members: removing the
        last one removes the group."""
        with self._tx() as db:
            current = [
                r[0]
                for r in db.execute("SELECT node FROM groups WHERE name=? ORDER BY node", (name,))
            ]
            gone = current if members is None else [m for m in current if m in set(members)]
            db.executemany("DELETE FROM groups WHERE name=? AND node=?", [(name, m) for m in gone])
        return gone

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
