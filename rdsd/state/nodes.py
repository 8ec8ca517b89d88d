"""Nodes, the routes to them, revocations and groups.

A node's ``via`` is the child session it is reached through: itself for a
direct child, the relay for a node behind one. Routes come from sessions and
from relays' TOPOLOGY, never from what a job says.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from ..domain import DestState, NodeRow, PresenceRow
from ..errors import JobError
from .base import Database

_NODE_COLS = "name, role, via, last_seen, revoked"


def _row(r: tuple[str, str, str | None, float | None, int]) -> NodeRow:
    return NodeRow(r[0], r[1], r[2], r[3], bool(r[4]))


class NodesMixin(Database):
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
        r = self._db.execute(f"SELECT {_NODE_COLS} FROM nodes WHERE name=?", (name,)).fetchone()
        return _row(r) if r else None

    def nodes(self) -> list[NodeRow]:
        return [_row(r) for r in self._db.execute(f"SELECT {_NODE_COLS} FROM nodes ORDER BY name")]

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
            "AND (j.at IS NULL OR j.at <= ?) AND d.state NOT IN (?, ?) LIMIT 1",
            (package, child, child, time.time(), DestState.CANCELLED, DestState.FAILED),
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
        nodes: list[tuple[str, str]],
        keep: set[str] | None,
        removed: Iterable[str] = (),
    ) -> None:
        """Route ``nodes`` (name, role) through ``via``; with ``keep``, forget
        routes through it for nodes not in ``keep`` (a whole subtree
        replaced); forget the routes of ``removed`` that go through it. One
        transaction."""
        with self._tx() as db:
            db.executemany(
                "INSERT INTO nodes(name, role, via) VALUES(?,?,?) "
                "ON CONFLICT(name) DO UPDATE SET role=excluded.role, via=excluded.via",
                [(name, role, via) for name, role in nodes],
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
        wanted = list(names)
        out: dict[str, tuple[str, str | None, bool]] = {}
        for i in range(0, len(wanted), 500):
            part = wanted[i : i + 500]
            for r in self._db.execute(
                "SELECT name, role, via, revoked FROM nodes "
                f"WHERE name IN ({','.join('?' * len(part))})",
                part,
            ):
                out[r[0]] = (r[1], r[2], bool(r[3]))
        return out

    # -- presence: who is connected now ------------------------------------------

    def presence_clear(self) -> None:
        """Nothing is connected to a parent half that has just started."""
        self._db.execute("UPDATE presence SET online=0 WHERE online=1")

    def presence_online(self, through: str, entries: dict[str, tuple[str, str]]) -> None:
        """Nodes ``name -> (parent, software)`` are connected now; the news
        came over the child session ``through``."""
        now = time.time()
        with self._tx() as db:
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
        with self._tx() as db:
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

    def presence(self) -> dict[str, PresenceRow]:
        return {
            r[0]: PresenceRow(r[0], r[1], r[2], r[3], bool(r[4]), r[5], r[6])
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
