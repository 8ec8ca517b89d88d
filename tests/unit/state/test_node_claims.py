"""The job database's part of the trust rules: what enrolment records, the
attach-claim counter, routes that are never made for unknown names, and the
one-time repair of values stored before peer input was checked."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from rdsd.domain import DestState, JobType
from rdsd.state import JobDB
from rdsd.validate import MAX_DETAIL, TIME_CEILING


def test_the_claim_counter_only_grows(tmp_path: Path) -> None:
    db = JobDB(tmp_path / "state.db")
    first = db.next_claim_counter()
    assert first >= int(time.time() * 1_000_000) - 5_000_000
    assert db.next_claim_counter() > first
    # A counter stored ahead of the clock (a clock that went back) still grows.
    db._db.execute("UPDATE meta SET value=? WHERE key='claim'", (first + 10**12,))
    assert db.next_claim_counter() == first + 10**12 + 1
    db.close()


def test_enrolment_records_the_certificate_and_forgets_old_claims(tmp_path: Path) -> None:
    db = JobDB(tmp_path / "state.db")
    db.enroll("c1", "client", 0xABC, b"key1")
    db.route_through("relay1", [("c1", "client", b"claim", 7, "relay1")], keep=None, create=False)
    row = db.claim_index(["c1"])["c1"]
    assert (row.via, row.claim, row.counter, row.pubkey) == ("relay1", b"claim", 7, b"key1")
    assert db.enrolment("c1") == (True, str(0xABC))
    db.enroll("c1", "client", 0xDEF, b"key2")  # a re-issued bundle
    row = db.claim_index(["c1"])["c1"]
    assert (row.via, row.claim, row.counter, row.pubkey) == (None, None, None, b"key2")
    db.close()


def test_the_server_never_makes_a_node_from_a_route(tmp_path: Path) -> None:
    db = JobDB(tmp_path / "state.db")
    db.route_through("relay1", [("ghost", "client", b"c", 1, "relay1")], keep=None, create=False)
    db.upsert_node("ghost2", "client", via="ghost2", claim=(b"c", 1, "hq"), create=False)
    assert db.node("ghost") is None and db.node("ghost2") is None
    # A relay, which has no enrolment list, keeps routes for what is below it.
    db.route_through("relay1", [("below", "client", b"c", 1, "relay1")], keep=None)
    row = db.node("below")
    assert row is not None and row.via == "relay1"
    db.close()


def test_bad_values_stored_before_are_repaired_once(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    db = JobDB(path)
    db.enroll("c1", "client")
    jid = db.create_job(JobType.INSTALL, "app-1", ["c1", "c2"], b"env", None, "hq")
    db.set_holdings("relay1", {"app-1": 1e300, "app-2": 2e9})
    db.close()
    raw = sqlite3.connect(path)
    with raw:
        raw.execute("DELETE FROM meta WHERE key='repaired'")
        raw.execute("UPDATE dests SET state='bogus', updated=1e300 WHERE node='c1'")
        raw.execute("UPDATE dests SET detail=?, seq=1e300, updated=-1e18 WHERE node='c2'",
                    ("x" * 200_000,))  # fmt: skip
        raw.execute("UPDATE nodes SET last_seen=1e300, via='relay1' WHERE name='c1'")
    raw.close()
    db = JobDB(path)
    c1, c2 = db.dest(jid, "c1"), db.dest(jid, "c2")
    assert c1 is not None and c1.state is DestState.FAILED and c1.updated == TIME_CEILING
    assert c2 is not None and len(c2.detail) == MAX_DETAIL and c2.updated == 0.0
    assert db._db.execute("SELECT seq FROM dests WHERE node='c2'").fetchone()[0] == 0
    node = db.node("c1")
    assert node is not None and node.last_seen == TIME_CEILING
    assert node.via is None  # a route without an attach claim is not believed
    assert db.holdings() == {"relay1": {"app-2": 2e9}}
    db.close()


def test_stored_values_read_in_range_even_without_the_repair(tmp_path: Path) -> None:
    db = JobDB(tmp_path / "state.db")
    jid = db.create_job(JobType.INSTALL, "app-1", ["c1"], b"env", None, "hq")
    db._db.execute("UPDATE dests SET state='bogus', updated=1e300")
    (dest,) = db.dests(jid)
    assert dest.state is DestState.FAILED and dest.updated == TIME_CEILING
    ((_, counts),) = db.job_summaries()
    assert counts == {"failed": 1}
    db.close()
