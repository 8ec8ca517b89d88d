"""What each node holds (a relay's cache, by its HOLDINGS) and what each
node has installed (from its reports)."""

from __future__ import annotations

import sqlite3

from ..validate import clamp_time
from .base import Database


class InventoryMixin(Database):
    @staticmethod
    def _record_installed(
        db: sqlite3.Connection, node: str, package: str, jid: str, when: float
    ) -> None:
        db.execute("INSERT OR REPLACE INTO installed VALUES(?,?,?,?)", (node, package, jid, when))

    def set_holdings(self, node: str, packages: dict[str, float]) -> None:
        """A relay's HOLDINGS replaces what was recorded for it."""
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
            out.setdefault(n, {})[p] = clamp_time(e) or 0.0
        return out

    def installed(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for n, p in self._db.execute("SELECT node, package FROM installed ORDER BY node, package"):
            out.setdefault(n, []).append(p)
        return out
