"""The job database's listener: every write that records a job or moves a
destination hands typed events over after its commit, with ``old`` read in
the same transaction; a refused, repeated or rolled-back write hands over
nothing."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from protocol import Report
from rdsd.domain import DestState, IncomingJob, JobType
from rdsd.errors import IllegalTransition
from rdsd.events import DestChanged, Event, JobReceived
from rdsd.state import Applied, JobDB

S = DestState


class Recorder:
    """The sink: keeps every event and checks each arrives after its commit
    (a second connection already reads the new state)."""

    def __init__(self, path: Path) -> None:
        self.events: list[Event] = []
        self.reader = sqlite3.connect(path)

    def __call__(self, event: Event) -> None:
        if isinstance(event, DestChanged):
            row = self.reader.execute(
                "SELECT state, detail FROM dests WHERE job=? AND node=?", (event.job, event.node)
            ).fetchone()
            assert row == (event.new, event.detail), (row, event)
        self.events.append(event)

    def moves(self) -> list[tuple[str, DestState | None, DestState, str]]:
        return [(e.node, e.old, e.new, e.detail) for e in self.events if isinstance(e, DestChanged)]


@pytest.fixture
def db(tmp_path: Path) -> JobDB:
    return JobDB(tmp_path / "state.db")


@pytest.fixture
def seen(db: JobDB, tmp_path: Path) -> Recorder:
    rec = Recorder(tmp_path / "state.db")
    db.listen("relay", rec)
    return rec


def incoming(generation: int = 0, dests: tuple[str, ...] = ("c1",)) -> IncomingJob:
    return IncomingJob(
        id="j1",
        type=JobType.INSTALL,
        package="tool-1.0",
        destinations=list(dests),
        envelope=b"env",
        at=None,
        origin="hq",
        generation=generation,
    )


def report(seq: int, state: DestState, detail: str = "") -> Report:
    return Report(
        report_id=f"c1:{seq}", job="j1", node="c1", state=state, seq=seq, detail=detail,
        package="tool-1.0",
    )  # fmt: skip


def test_a_created_job_is_one_change_per_destination(db: JobDB, seen: Recorder) -> None:
    db.create_job(JobType.INSTALL, "tool-1.0", ["c1", "c2"], b"env", None, "hq", job_id="j1")
    assert seen.moves() == [("c1", None, S.WAITING, ""), ("c2", None, S.WAITING, "")]
    assert all(isinstance(e, DestChanged) and e.source == "relay" for e in seen.events)
    assert {e.package for e in seen.events if isinstance(e, DestChanged)} == {"tool-1.0"}


def test_a_received_job_comes_first_and_a_repeat_says_nothing(db: JobDB, seen: Recorder) -> None:
    db.receive_job(incoming(dests=("c1", "c2")))
    first = seen.events[0]
    assert isinstance(first, JobReceived)
    assert (first.job, first.job_type, first.package, first.destinations) == (
        "j1",
        JobType.INSTALL,
        "tool-1.0",
        ("c1", "c2"),
    )
    assert seen.moves() == [("c1", None, S.WAITING, ""), ("c2", None, S.WAITING, "")]
    db.receive_job(incoming(dests=("c1", "c2")))
    assert len(seen.events) == 3


def test_every_local_and_reported_change_says_where_it_came_from(db: JobDB, seen: Recorder) -> None:
    db.receive_job(incoming())
    # Changes made at this node (a relay, whose sequence numbers start from
    # its clock), then reports from c1 below it, whose numbers are its own.
    db.change("j1", "c1", S.TRANSFERRING, "", "relay", report=True)
    db.change("j1", "c1", S.TRANSFERRING, "40%", "relay", report=True)
    assert db.apply_report(report(5, S.INSTALLING), forward=False) is Applied.APPLIED
    assert db.apply_report(report(5, S.INSTALLING), forward=False) is Applied.REPEAT
    assert db.apply_report(report(6, S.TRANSFERRING), forward=False) is Applied.ILLEGAL
    with pytest.raises(IllegalTransition):
        db.change("j1", "c1", S.WAITING, "", "relay", report=True)
    assert db.apply_report(report(7, S.FAILED, "exit 1"), forward=False) is Applied.APPLIED
    assert seen.moves() == [
        ("c1", None, S.WAITING, ""),
        ("c1", S.WAITING, S.TRANSFERRING, ""),
        ("c1", S.TRANSFERRING, S.TRANSFERRING, "40%"),
        ("c1", S.TRANSFERRING, S.INSTALLING, ""),
        ("c1", S.INSTALLING, S.FAILED, "exit 1"),
    ]
    # A change without a package argument still names the job's package.
    assert {e.package for e in seen.events if isinstance(e, DestChanged)} == {"tool-1.0"}


def test_retries_reset_to_waiting_from_where_they_were(db: JobDB, seen: Recorder) -> None:
    db.receive_job(incoming())
    db.change("j1", "c1", S.FAILED, "exit 1", "c1", report=False)
    assert db.reset_failed("j1") == ["c1"]
    db.change("j1", "c1", S.INSTALLING, "", "c1", report=False)
    db.change("j1", "c1", S.INSTALLED, "", "c1", report=False)
    assert db.receive_job(incoming(generation=5)) == ["c1"]
    assert seen.moves()[1:] == [
        ("c1", S.WAITING, S.FAILED, "exit 1"),
        ("c1", S.FAILED, S.WAITING, "retry"),
        ("c1", S.WAITING, S.INSTALLING, ""),
        ("c1", S.INSTALLING, S.INSTALLED, ""),
        ("c1", S.INSTALLED, S.WAITING, "retry"),
    ]


def test_a_rolled_back_write_says_nothing(db: JobDB, seen: Recorder) -> None:
    db.receive_job(incoming())
    before = len(seen.events)
    with pytest.raises(sqlite3.IntegrityError):
        db.create_job(JobType.INSTALL, "tool-1.0", ["c1"], b"env", None, "hq", job_id="j1")
    assert len(seen.events) == before


def test_writes_work_without_a_listener(db: JobDB) -> None:
    """The command line's connection has none: nothing changes for it."""
    assert not db.listened
    db.create_job(JobType.INSTALL, "tool-1.0", ["c1"], b"env", None, "hq", job_id="j1")
    db.change("j1", "c1", S.CANCELLED, "", "hq", report=False)
    dest = db.dest("j1", "c1")
    assert dest is not None and dest.state is S.CANCELLED
