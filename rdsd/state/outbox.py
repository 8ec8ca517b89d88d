"""The report outbox: state changes waiting for the parent's acknowledgement.

A report is written in the same transaction as the change it carries and
deleted only when the parent says it has committed it, so a crash on either
side loses nothing and a repeat changes nothing (``seq`` grows at the node
that made the change).
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

from .base import Database

if TYPE_CHECKING:
    from protocol import Report


class OutboxMixin(Database):
    def _next_seq(self, db: sqlite3.Connection) -> int:
        db.execute("UPDATE meta SET value = value + 1 WHERE key='seq'")
        return int(db.execute("SELECT value FROM meta WHERE key='seq'").fetchone()[0])

    @staticmethod
    def _enqueue(db: sqlite3.Connection, rep: Report) -> None:
        db.execute(
            "INSERT OR IGNORE INTO outbox(report_id, job, node, state, detail, seq, origin, "
            "package, time, sig) VALUES(?,?,?,?,?,?,?,?,?,?)",
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
                rep.sig or None,
            ),
        )

    def outbox(self) -> list[Report]:
        """Every report not yet acknowledged, oldest first."""
        return [report for _, report in self.outbox_after(0, -1)]

    def outbox_after(self, after: int, limit: int = 1000) -> list[tuple[int, Report]]:
        """Unacknowledged reports queued after position ``after`` (at most
        ``limit``; -1 for all), oldest first, with their positions: a sender
        that remembers how far it got on a session reads only what is new."""
        # Imported here: the message classes cost a command that only reads
        # the job database (``rdsd job status``) a tenth of its time.
        from protocol import Report

        return [
            (
                r[0],
                Report(
                    report_id=r[1],
                    job=r[2],
                    node=r[3],
                    state=r[4],
                    detail=r[5],
                    seq=r[6],
                    origin=r[7],
                    package=r[8],
                    time=r[9],
                    sig=bytes(r[10]) if r[10] is not None else b"",
                ),
            )
            for r in self._db.execute(
                "SELECT id, report_id, job, node, state, detail, seq, origin, package, time, sig "
                "FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                (after, limit),
            )
        ]

    def ack(self, report_id: str) -> None:
        self._db.execute("DELETE FROM outbox WHERE report_id=?", (report_id,))

    def ack_many(self, report_ids: list[str]) -> None:
        """Forget acknowledged reports in one transaction, without waiting
        for the disk: a forgotten report that a crash of the machine brings
        back only goes up again, and the parent, which recorded it, just
        acknowledges it again (report ids make a repeat a no-op). A relay
        forgetting its children's reports as the server acknowledges them
        made every third commit of a fleet's job an fsync on the loop."""
        with self._tx(durable=False) as db:
            db.executemany("DELETE FROM outbox WHERE report_id=?", [(r,) for r in report_ids])
