"""The job database on its own: the destination lifecycle is enforced on
every change, local or reported, and reports apply exactly once."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from protocol import Report
from rdsd.domain import DestState, IncomingJob, JobType
from rdsd.errors import IllegalTransition
from rdsd.state import Applied, JobDB
from tests.helpers import sqlite_steps

S = DestState


@pytest.fixture
def db(tmp_path: Path) -> JobDB:
    jdb = JobDB(tmp_path / "state.db")
    jdb.create_job(
        JobType.INSTALL, "tool-1.0", ["c1", "c2"], b"env", None, origin="hq", job_id="j1"
    )
    return jdb


def report(seq: int, state: str, node: str = "c1", origin: str | None = None) -> Report:
    return Report(
        report_id=f"{origin or node}:{seq}", job="j1", node=node, state=state, seq=seq,
        origin=origin,
    )  # fmt: skip


def test_records_carry_enums(db: JobDB) -> None:
    dest = db.dest("j1", "c1")
    job = db.job("j1")
    assert dest is not None and dest.state is S.WAITING
    assert job is not None and job.type is JobType.INSTALL


def test_local_change_follows_the_table(db: JobDB) -> None:
    db.change("j1", "c1", S.TRANSFERRING, "", "c1", report=True)
    db.change("j1", "c1", S.INSTALLING, "", "c1", report=True)
    db.change("j1", "c1", S.INSTALLED, "", "c1", report=True, package="tool-1.0")
    with pytest.raises(IllegalTransition):
        db.change("j1", "c1", S.TRANSFERRING, "", "c1", report=True)
    dest = db.dest("j1", "c1")
    assert dest is not None and dest.state is S.INSTALLED
    assert db.installed() == {"c1": ["tool-1.0"]}
    assert [r.state for r in db.outbox()] == ["transferring", "installing", "installed"]


def test_refused_local_change_writes_no_report(db: JobDB) -> None:
    db.change("j1", "c1", S.CANCELLED, "", "hq", report=False)
    with pytest.raises(IllegalTransition):
        db.change("j1", "c1", S.TRANSFERRING, "5%", "c1", report=True)
    assert db.outbox() == []


def test_report_applies_once_and_repeats_change_nothing(db: JobDB) -> None:
    assert db.apply_report(report(3, "transferring"), forward=True) is Applied.APPLIED
    assert db.apply_report(report(3, "transferring"), forward=True) is Applied.REPEAT
    assert db.apply_report(report(2, "installed"), forward=True) is Applied.REPEAT
    assert [r.report_id for r in db.outbox()] == ["c1:3"]


def test_report_outside_the_lifecycle_is_refused(db: JobDB) -> None:
    assert db.apply_report(report(2, "installing"), forward=False) is Applied.APPLIED
    assert db.apply_report(report(3, "installed"), forward=False) is Applied.APPLIED
    assert db.apply_report(report(4, "transferring"), forward=False) is Applied.ILLEGAL
    assert db.apply_report(report(5, "failed"), forward=False) is Applied.ILLEGAL
    assert db.apply_report(report(6, "bogus"), forward=False) is Applied.ILLEGAL
    dest = db.dest("j1", "c1")
    assert dest is not None and dest.state is S.INSTALLED
    # Only a passing state may be skipped: a stored relay never installs.
    db.change("j1", "c2", S.STORED, "", "hq", report=False)
    assert db.apply_report(report(7, "installed", node="c2"), forward=False) is Applied.ILLEGAL


def test_an_outcome_that_overtakes_its_progress_reports_is_applied(db: JobDB) -> None:
    """Reports can arrive out of order (a node moved to another relay while
    the old one held its earlier reports): ``installed`` arriving before the
    ``installing`` it followed at the node is applied, and the overtaken
    reports are repeats when they come, not a way back."""
    assert db.apply_report(report(3, "installed"), forward=True) is Applied.APPLIED
    assert db.apply_report(report(1, "transferring"), forward=True) is Applied.REPEAT
    assert db.apply_report(report(2, "installing"), forward=True) is Applied.REPEAT
    dest = db.dest("j1", "c1")
    assert dest is not None and dest.state is S.INSTALLED
    assert [r.report_id for r in db.outbox()] == ["c1:3"]  # forwarded once
    # From transferring, the same.
    assert db.apply_report(report(1, "transferring", node="c2"), False) is Applied.APPLIED
    assert db.apply_report(report(3, "installed", node="c2"), False) is Applied.APPLIED


def test_report_for_an_unknown_destination(db: JobDB) -> None:
    assert db.apply_report(report(1, "installed", node="ghost"), False) is Applied.NO_DEST


def test_late_progress_report_does_not_reopen_a_cancel(db: JobDB) -> None:
    db.change("j1", "c1", S.CANCELLED, "cancelled by the operator", "hq", report=False)
    assert db.apply_report(report(7, "transferring"), forward=False) is Applied.ILLEGAL
    dest = db.dest("j1", "c1")
    assert dest is not None and dest.state is S.CANCELLED
    # What really happened still wins: the node finished before it heard.
    assert db.apply_report(report(8, "installed"), forward=False) is Applied.APPLIED


def test_newer_generation_restarts_a_final_destination_but_not_a_cancelled_one(
    db: JobDB,
) -> None:
    db.change("j1", "c1", S.FAILED, "boom", "c1", report=False)
    db.change("j1", "c2", S.CANCELLED, "", "hq", report=False)
    again = IncomingJob("j1", JobType.INSTALL, "tool-1.0", ["c1", "c2"], b"env", None, "hq", 1)
    assert db.receive_job(again) == ["c1"]
    assert db.receive_job(again) == []  # the same notice twice changes nothing
    c1, c2 = db.dest("j1", "c1"), db.dest("j1", "c2")
    assert c1 is not None and c1.state is S.WAITING and c1.generation == 1
    assert c2 is not None and c2.state is S.CANCELLED


def test_a_reimaged_node_reports_past_its_old_sequence(tmp_path: Path) -> None:
    """Sequence numbers start from the clock, so a node whose home was made
    anew (re-imaged) reports with numbers above everything it sent before:
    its parent applies them instead of dropping them as repeats."""
    old = JobDB(tmp_path / "old.db")
    old.create_job(JobType.INSTALL, "tool-1.0", ["c1"], b"env", None, origin="hq", job_id="j1")
    for _ in range(1000):
        old.change("j1", "c1", S.TRANSFERRING, "", "c1", report=False)
    old_seq = old._next_seq(old._db)
    fresh = JobDB(tmp_path / "new.db")
    assert fresh._next_seq(fresh._db) > old_seq


def test_a_database_from_before_job_revisions_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "state.db"
    with sqlite3.connect(path) as raw:
        raw.execute(
            "CREATE TABLE jobs(id TEXT PRIMARY KEY, type TEXT NOT NULL, package TEXT NOT NULL, "
            "created REAL NOT NULL, at REAL, origin TEXT NOT NULL, manifest BLOB NOT NULL, "
            "announced INTEGER NOT NULL DEFAULT 1)"
        )
        raw.execute("INSERT INTO jobs VALUES('j0','install','tool-1.0',0,NULL,'hq',x'00',1)")
    db = JobDB(path)
    assert db.changed_jobs(0) == ([], 0)  # the old job carries revision 0
    db.create_job(JobType.INSTALL, "tool-1.0", ["c1"], b"env", None, origin="hq", job_id="j1")
    assert db.changed_jobs(0)[0] == ["j1"]


def test_reports_that_arrive_together_commit_together(db: JobDB) -> None:
    """One transaction for a batch: each report is judged on its own (a
    repeat or an illegal move in the batch changes nothing), in order, so
    two changes of one destination in one batch both apply."""
    batch = [
        report(1, "transferring"),
        report(2, "installing"),
        report(2, "installing"),  # a repeat within the batch
        report(3, "transferring"),  # illegal after installing
        report(4, "installed"),
        report(1, "failed", node="c2"),
    ]
    assert db.apply_reports(batch, forward=True) == [
        Applied.APPLIED,
        Applied.APPLIED,
        Applied.REPEAT,
        Applied.ILLEGAL,
        Applied.APPLIED,
        Applied.APPLIED,
    ]
    c1, c2 = db.dest("j1", "c1"), db.dest("j1", "c2")
    assert c1 is not None and c1.state is S.INSTALLED
    assert c2 is not None and c2.state is S.FAILED
    assert [r.report_id for r in db.outbox()] == ["c1:1", "c1:2", "c1:4", "c2:1"]


def test_acknowledgements_are_forgotten_together(db: JobDB) -> None:
    for state in (S.TRANSFERRING, S.INSTALLING, S.INSTALLED):
        db.change("j1", "c1", state, "", "c1", report=True, package="tool-1.0")
    queued = [r.report_id for r in db.outbox()]
    db.ack_many([*queued[:2], "unknown:1"])  # an unknown id is ignored
    assert [r.report_id for r in db.outbox()] == queued[2:]


def test_presence_commits_without_fsync_and_everything_else_stays_durable(
    tmp_path: Path,
) -> None:
    """Who is connected is rebuilt at start, so its writes skip the fsync; the
    connection is back to ``synchronous=FULL`` right after, also when the
    write fails, so a state change committed next is durable."""
    db = JobDB(tmp_path / "state.db")
    full = 2  # PRAGMA synchronous value of FULL
    assert db._db.execute("PRAGMA synchronous").fetchone()[0] == full
    db.presence_online("relay1", {"c1": ("relay1", "rdsd 1")})
    assert db._db.execute("PRAGMA synchronous").fetchone()[0] == full
    assert db.presence()["c1"].online
    assert db.presence_offline("relay1", ["c1"]) == ["c1"]
    assert db._db.execute("PRAGMA synchronous").fetchone()[0] == full
    with pytest.raises(sqlite3.IntegrityError), db._tx(durable=False) as conn:
        conn.execute("INSERT INTO meta(key, value) VALUES('k', NULL)")
    assert db._db.execute("PRAGMA synchronous").fetchone()[0] == full


def test_forgetting_acknowledged_reports_commits_without_fsync(db: JobDB) -> None:
    """An acknowledged report that comes back after a crash only goes up
    again, so forgetting it skips the fsync; recording a report does not."""
    statements: list[str] = []
    db._db.set_trace_callback(statements.append)
    db.change("j1", "c1", S.TRANSFERRING, "", "c1", report=True, package="tool-1.0")
    recorded = list(statements)
    statements.clear()
    db.ack_many([r.report_id for r in db.outbox()])
    db._db.set_trace_callback(None)
    assert not db.outbox()
    assert "COMMIT" in recorded and "PRAGMA synchronous=NORMAL" not in recorded
    assert statements.index("PRAGMA synchronous=NORMAL") < statements.index("COMMIT")
    assert statements[-1] == "PRAGMA synchronous=FULL"


def test_a_relay_records_a_childs_route_without_fsync_and_the_server_durably(
    db: JobDB,
) -> None:
    """A relay's record of a child's route and claim is rebuilt when the
    child reconnects, so it skips the fsync; the server's, against which
    later claims are judged, does not."""
    statements: list[str] = []
    db._db.set_trace_callback(statements.append)
    db.upsert_node("c1", "client", via="c1", claim=(b"claim", 1, "relay1"))
    relay = list(statements)
    statements.clear()
    db.upsert_node("c1", "client", via="c1", claim=(b"claim", 2, "relay1"), create=False)
    db._db.set_trace_callback(None)
    assert relay.index("PRAGMA synchronous=NORMAL") < relay.index("COMMIT")
    assert "PRAGMA synchronous=NORMAL" not in statements
    assert db._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL again


def _steps(db: JobDB, query: Callable[[], object], every: int = 100) -> int:
    """SQLite steps (in units of ``every``) that ``query`` takes."""
    with sqlite_steps(db._db, every) as count:
        query()
    return count[0]


def test_next_due_reads_the_scheduled_jobs_not_every_destination(tmp_path: Path) -> None:
    """Every housekeeping pass asks for the next execution time, and a pass
    follows each batch of reports: the answer must not cost a walk of a
    large job's destinations. Open and finished future jobs, past jobs and
    unscheduled ones are all judged right, and the cost with 5,000
    destinations stays what it is with 5."""
    db = JobDB(tmp_path / "state.db")
    now = time.time()
    db.create_job(JobType.INSTALL, "tool-1.0", ["c1", "c2"], b"env", None, "hq", job_id="now")
    db.create_job(JobType.INSTALL, "tool-1.0", ["c1"], b"env", now + 50, "hq", job_id="done")
    db.change("done", "c1", S.CANCELLED, "", "hq", report=False)
    db.create_job(JobType.INSTALL, "tool-1.0", ["c2"], b"env", now + 90, "hq", job_id="later")
    db.create_job(JobType.INSTALL, "tool-1.0", ["c3"], b"env", now - 10, "hq", job_id="past")
    assert db.next_due(now) == now + 90  # "done" has no open destination left
    small = _steps(db, lambda: db.next_due(now))
    nodes = [f"n{i}" for i in range(5000)]
    db.create_job(JobType.INSTALL, "tool-1.0", nodes, b"env", None, "hq", job_id="big")
    db.create_job(JobType.INSTALL, "tool-1.0", nodes, b"env", now - 5, "hq", job_id="big-past")
    assert db.next_due(now) == now + 90
    assert _steps(db, lambda: db.next_due(now)) <= small + 1
    db.change("later", "c2", S.CANCELLED, "", "hq", report=False)
    assert db.next_due(now) is None


def _write_pages(db: JobDB, jobs: int) -> None:
    """Commits that together put well over 1,000 pages into the log."""
    nodes = [f"node-with-a-longish-name-{i:05d}" for i in range(2000)]
    for j in range(jobs):
        db.create_job(JobType.INSTALL, "tool-1.0", nodes, b"e" * 2000, None, "hq", job_id=f"w{j}")


def test_deferred_checkpoints_leave_the_log_to_the_checkpointer(tmp_path: Path) -> None:
    """A daemon's commits do not copy the write-ahead log into the database
    themselves (on its event loop that was a relay's longest stall); its
    checkpointer does, from another thread, and every commit is there
    before and after."""
    plain = JobDB(tmp_path / "plain.db")
    _write_pages(plain, 8)
    left_by_commits, _ = plain.checkpoint()
    db = JobDB(tmp_path / "state.db")
    db.defer_checkpoints()
    _write_pages(db, 8)
    with ThreadPoolExecutor(1) as pool:
        log, copied = pool.submit(db.checkpoint).result(timeout=30)
    # The commits left the whole log to the checkpoint; without deferring,
    # they had copied it themselves each time it passed 1,000 pages.
    assert log == copied > 1000 > left_by_commits
    assert len(db.dests("w7")) == 2000
    db.close()
    reopened = JobDB(tmp_path / "state.db")
    assert len(reopened.dests("w0")) == len(reopened.dests("w7")) == 2000
