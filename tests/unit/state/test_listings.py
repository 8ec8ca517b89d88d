"""The fleet-size listings (``dest_listing``, ``node_listing``) read the
same values the record-by-record readers do (``dests`` with ``progress``,
``nodes`` with ``presence``), including what older versions may have
stored: states that are not states, times out of range or not numbers,
progress points of a destination no longer transferring. They only do the
clamping in SQL and skip building a record per row."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from rdsd.admin import Admin, ops
from rdsd.config import iso
from rdsd.domain import DestState, JobType, Role
from rdsd.state import JobDB
from tests.helpers import Deployment, enroll_node

NODES = ["c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8"]


@pytest.fixture
def db(tmp_path: Path) -> JobDB:
    jdb = JobDB(tmp_path / "state.db")
    jdb.create_job(JobType.INSTALL, "tool-1.0", NODES, b"env", None, origin="hq", job_id="j1")
    jdb.create_job(JobType.INSTALL, "tool-1.0", ["c1"], b"env", None, origin="hq", job_id="j2")
    raw = jdb._db
    odd = [
        ("c1", "installed", "install command exited 0", 1_700_000_000.75),
        ("c2", "transferring", "40% [bytes 40/100]", 1_700_000_100),  # an integer time
        ("c3", "bogus", "stored before states were checked", 1e300),
        ("c4", "transferring", "no progress yet", -5.0),
        ("c5", "failed", "a text time", "yesterday"),
        ("c6", "installing", "", 253_402_300_799.5),
        ("c7", "cancelled", "cancelled by the operator", 0),
    ]
    for node, state, detail, updated in odd:
        raw.execute(
            "UPDATE dests SET state=?, detail=?, updated=? WHERE job='j1' AND node=?",
            (state, detail, updated, node),
        )
    raw.executemany(
        "INSERT INTO progress VALUES(?,?,?,?,?,?,?)",
        [
            ("j1", "c2", 40, 100, 1_700_000_100.5, 10, 1_700_000_090.0),
            ("j1", "c1", 100, 100, 1_700_000_000.0, 90, None),  # no longer transferring
            ("j2", "c1", 5, 100, 1e300, None, None),
        ],
    )
    raw.execute("UPDATE dests SET state='transferring' WHERE job='j2'")
    for name, role in [("c1", Role.CLIENT), ("c2", Role.CLIENT), ("r1", Role.RELAY)]:
        jdb.enroll(name, role)
    raw.executemany(
        "INSERT INTO nodes(name, role, via, last_seen, revoked) VALUES(?,?,?,?,?)",
        [
            ("c3", "client", "r1", 1e300, 0),
            ("c4", "client", "c4", "never", 1),
            ("c5", "client", None, -3.0, 0),
            ("c6", "client", "r1", 1_700_000_000, 0),
        ],
    )
    raw.executemany(
        "INSERT INTO presence VALUES(?,?,?,?,?,?,?)",
        [
            ("c1", "hq", "rdsd/0.1.0", "c1", 1, 1_700_000_000.5, 1_700_000_001.5),
            ("c3", "r1", "", "r1", 0, -1.0, 1e300),
            ("c6", "r1", "rdsd/0.1.0", "r1", 2, "soon", 1_699_999_999),
            ("ghost", "r1", "rdsd/0.1.0", "r1", 1, 1.0, 2.0),  # not a known node
        ],
    )
    return jdb


@pytest.mark.parametrize("job", ["j1", "j2", "j-none"])
def test_dest_listing_reads_what_dests_and_progress_read(db: JobDB, job: str) -> None:
    progress = db.progress(job)
    expected = [(d.node, d.state, d.detail, d.updated, progress.get(d.node)) for d in db.dests(job)]
    listed = db.dest_listing(job)
    assert listed == expected
    assert [type(row[1]) for row in listed] == [DestState] * len(listed)


def test_dest_listing_reads_unknown_states_as_failed(db: JobDB) -> None:
    rows = {row[0]: row for row in db.dest_listing("j1")}
    assert rows["c3"][1] is DestState.FAILED
    assert rows["c5"][3] == 0.0  # a stored text is no time
    assert rows["c3"][3] == 253_402_300_799.0  # brought back into the years 1970-9999


def test_node_listing_reads_what_nodes_and_presence_read(db: JobDB) -> None:
    presence = db.presence()
    expected = []
    for n in db.nodes():
        here = presence.get(n.name)
        news = None
        if here is not None:
            news = (here.online, here.parent, here.software, here.since, here.seen)
        expected.append((n.name, n.role, n.via, n.last_seen, n.revoked, news))
    assert db.node_listing() == expected
    assert "ghost" not in [row[0] for row in db.node_listing()]


def test_admin_listings_show_what_they_showed_record_by_record(
    deployment: Deployment, package_src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``job_status`` and ``nodes`` as the command line prints them: the
    same documents, key for key, as building them from the records."""
    for name in ("c1", "c2", "c3"):
        enroll_node(deployment, name, Role.CLIENT)
    enroll_node(deployment, "r1", Role.RELAY)
    with Admin(deployment.server.home) as admin:
        pid = admin.add_package(package_src, "tool", "1.0", "true")
        job = admin.create_job(JobType.INSTALL, pid, ["c1", "c2", "c3"])
        raw = admin.db._db
        raw.execute(
            "UPDATE dests SET state='transferring', detail='5% [bytes 5/100]' WHERE node='c2'"
        )
        raw.execute("UPDATE dests SET state='bogus', updated=1e300 WHERE node='c3'")
        raw.execute("INSERT INTO progress VALUES(?,'c2',5,100,?,1,?)", (job, 1e9 + 2, 1e9))
        raw.execute("UPDATE nodes SET via='r1', last_seen=1e9 WHERE name IN ('c1','c2')")
        raw.execute("INSERT INTO presence VALUES('c1','r1','rdsd/0.1.0','r1',1,1e9,1e9+5)")
        raw.execute("INSERT INTO presence VALUES('c2','r1','','r1',0,1e9,2e9)")
        raw.execute("INSERT INTO holdings VALUES('r1',?,1e300)", (pid,))
        monkeypatch.setattr(time, "time", lambda: 1_800_000_000.5)

        status = admin.job_status(job)
        progress = admin.db.progress(job)
        assert status["destinations"] == [
            {
                "node": d.node,
                "state": d.state,
                "detail": d.detail,
                "updated": iso(d.updated),
                **ops.progress_fields(progress.get(d.node)),
            }
            for d in admin.db.dests(job)
        ]
        assert [list(d) for d in status["destinations"]] == [
            ["node", "state", "detail", "updated", "bytes_done", "bytes_total", "rate", "eta"]
        ] * 3

        held, installed, presence = admin.db.holdings(), admin.db.installed(), admin.db.presence()
        expected = []
        for n in admin.db.nodes():
            here = presence.get(n.name)
            online = here is not None and here.online
            via = here.parent if here is not None else ("server" if n.via == n.name else n.via)
            times = [t for t in (n.last_seen, here.seen if here else None) if t is not None]
            expected.append(
                {
                    "name": n.name,
                    "role": n.role,
                    "online": online,
                    "via": via,
                    "route": n.via,
                    "version": (here.software or None) if here else None,
                    "last_seen": iso(1_800_000_000.5 if online else max(times, default=None)),
                    "connected_since": iso(here.since) if online and here else None,
                    "revoked": n.revoked,
                    "paced_at": None,
                    "installed": installed.get(n.name, []),
                    "holds": [
                        {"package": p, "expires": iso(e)}
                        for p, e in sorted(held.get(n.name, {}).items())
                    ],
                }
            )
        assert admin.nodes() == expected
        assert [list(n) for n in admin.nodes()] == [list(e) for e in expected]
