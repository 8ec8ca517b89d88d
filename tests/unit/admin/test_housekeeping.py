"""The housekeeping operations: removing a package, listing and removing
groups, pruning finished jobs, and the idempotency key of job creation."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from rdsd.admin import Admin, enroll, init_server
from rdsd.config import HomePaths
from rdsd.domain import DestState, Role
from rdsd.errors import AdminError


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[Admin]:
    home = tmp_path / "server"
    init_server(home, name="hq", listen=("127.0.0.1", 0))
    for name, role in (("relay1", Role.RELAY), ("c1", Role.CLIENT), ("c2", Role.CLIENT)):
        enroll(home, name, role, tmp_path / f"{name}.bundle")
    src = tmp_path / "src"
    src.mkdir()
    (src / "file.txt").write_text("payload\n")
    with Admin(home) as adm:
        adm.add_package(src, "tool", "1.0")
        adm.add_package(src, "tool", "2.0")
        yield adm


def age(admin: Admin, job: str, seconds: float) -> None:
    """Make ``job``'s destinations look ``seconds`` older than they are."""
    with sqlite3.connect(admin.paths.db) as db:
        db.execute("UPDATE dests SET updated = updated - ? WHERE job=?", (seconds, job))
        db.execute("UPDATE jobs SET created = created - ? WHERE id=?", (seconds, job))


# -- package remove -----------------------------------------------------------------------


def test_remove_package_deletes_it(admin: Admin) -> None:
    store = HomePaths(admin.paths.home).store
    assert (store / "tool-2.0.pkg").exists()
    admin.remove_package("tool-2.0")
    assert not (store / "tool-2.0.pkg").exists() and not (store / "tool-2.0.env").exists()
    assert [p.id for p in admin.packages()] == ["tool-1.0"]
    with pytest.raises(AdminError, match=r"no package 'tool-2\.0'"):
        admin.create_job("install", "tool-2.0", ["c1"])


def test_remove_package_waits_for_unfinished_jobs(admin: Admin) -> None:
    first = admin.create_job("install", "tool-1.0", ["c1", "c2"])
    second = admin.create_job("offer", "tool-1.0", ["c2"])
    with pytest.raises(AdminError) as err:
        admin.remove_package("tool-1.0")
    assert f"unfinished job {first}, {second}" in str(err.value)
    assert admin.store.has("tool-1.0")
    admin.cancel(first)
    with pytest.raises(AdminError, match=second):
        admin.remove_package("tool-1.0")
    admin.cancel(second)
    admin.remove_package("tool-1.0")
    assert not admin.store.has("tool-1.0")


def test_retry_after_the_package_was_removed_is_refused(admin: Admin) -> None:
    job = admin.create_job("install", "tool-1.0", ["c1"])
    admin.db.change(job, "c1", DestState.FAILED, "boom", "hq", report=False)
    admin.remove_package("tool-1.0")
    with pytest.raises(AdminError, match="no longer in this storehouse"):
        admin.retry(job)


# -- groups -------------------------------------------------------------------------------


def test_group_list_and_remove(admin: Admin) -> None:
    assert admin.groups() == {}
    admin.add_group("lab", ["c1", "c2"])
    admin.add_group("relays", ["relay1"])
    admin.add_group("lab", ["c1"])  # adding a member again changes nothing
    assert admin.groups() == {"lab": ["c1", "c2"], "relays": ["relay1"]}
    assert admin.remove_group("lab", ["c2"]) == ["c2"]
    assert admin.groups() == {"lab": ["c1"], "relays": ["relay1"]}
    assert admin.remove_group("relays") == ["relay1"]
    assert admin.groups() == {"lab": ["c1"]}
    assert admin.remove_group("lab", ["c1"]) == ["c1"]
    assert admin.groups() == {}


def test_jobs_made_for_a_group_keep_their_destinations(admin: Admin) -> None:
    admin.add_group("lab", ["c1", "c2"])
    job = admin.create_job("install", "tool-1.0", ["group:lab"])
    admin.remove_group("lab")
    assert [d["node"] for d in admin.job_status(job)["destinations"]] == ["c1", "c2"]


# -- job prune ----------------------------------------------------------------------------


def test_prune_removes_only_finished_jobs_older_than_asked(admin: Admin) -> None:
    old_done = admin.create_job("install", "tool-1.0", ["c1"])
    admin.cancel(old_done)
    age(admin, old_done, 7200)
    new_done = admin.create_job("install", "tool-1.0", ["c2"])
    admin.cancel(new_done)
    old_open = admin.create_job("install", "tool-2.0", ["c1", "c2"])
    admin.db.change(old_open, "c1", DestState.INSTALLING, "", "hq", report=False)
    admin.db.change(old_open, "c1", DestState.INSTALLED, "", "hq", report=False)
    age(admin, old_open, 7200)
    assert admin.prune_jobs(3600) == [old_done]
    assert {j["id"] for j in admin.jobs()} == {new_done, old_open}
    with pytest.raises(AdminError, match="no job"):
        admin.job_status(old_done)
    assert admin.prune_jobs(3600) == []


def test_prune_forgets_the_request_id_with_the_job(admin: Admin) -> None:
    job = admin.create_job("install", "tool-1.0", ["c1"], request_id="deploy-42")
    admin.cancel(job)
    age(admin, job, 7200)
    assert admin.prune_jobs(60) == [job]
    again = admin.create_job("install", "tool-1.0", ["c1"], request_id="deploy-42")
    assert again != job


# -- request ids ------------------------------------------------------------------------


def test_request_id_makes_one_job(admin: Admin) -> None:
    first = admin.create_job("install", "tool-1.0", ["c1"], request_id="rollout-7")
    second = admin.create_job("install", "tool-1.0", ["c1"], request_id="rollout-7")
    assert first == second
    assert [j["id"] for j in admin.jobs()] == [first]
    with Admin(admin.paths.home) as other:  # durable: another process sees it
        assert other.create_job("install", "tool-1.0", ["c1"], request_id="rollout-7") == first
    with pytest.raises(AdminError, match=f"already made job {first}"):
        admin.create_job("install", "tool-2.0", ["c1"], request_id="rollout-7")
    assert len(admin.jobs()) == 1
    other_job = admin.create_job("install", "tool-1.0", ["c1"], request_id="rollout-8")
    assert other_job != first


def test_request_id_under_concurrency(admin: Admin) -> None:
    """Several processes (here threads, each with its own connection) racing
    with one key make one job: the key and the job commit together."""
    home = admin.paths.home
    results: list[str] = []
    errors: list[BaseException] = []

    def create() -> None:
        try:
            with Admin(home) as mine:
                results.append(mine.create_job("install", "tool-1.0", ["c2"], request_id="race"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert len(results) == 6 and len(set(results)) == 1
    assert [j["id"] for j in admin.jobs()] == results[:1]
