"""Attacks on results and on the listings (part 2 of the trust
requirements): forged and replayed reports, and every kind of bad field
value a child can put in a REPORT or a relay in HOLDINGS. Each is refused
(acknowledged and dropped, logged), the session goes on, other children are
served, and ``rdsd nodes`` / ``job list`` / ``job status`` keep working,
here and through the command line."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import time
from pathlib import Path

import pytest

from protocol import Holdings, Report, Topology
from rdsd.claims import ClaimSigner
from rdsd.domain import Role
from rdsd.validate import MAX_DETAIL
from tests.adversarial.trust import (
    add_package,
    bystander_served,
    listings_work,
    send_report,
    still_open,
)
from tests.helpers import Deployment, RawChild, rdsd_cmd, running, wait_routed


def report(
    job: str, pid: str, seq: int, state: str, node: str = "client1", **more: object
) -> Report:
    rep = Report(
        report_id=f"{more.get('origin') or node}:{seq}", job=job, node=node, state=state,
        seq=seq, package=pid, time=time.time(), origin=node,
    )  # fmt: skip
    return dataclasses.replace(rep, **more)  # type: ignore[arg-type]


def state_of(dep: Deployment, job: str, node: str = "client1") -> tuple[str, str]:
    with dep.admin() as admin:
        dest = admin.db.dest(job, node)
        assert dest is not None
        return str(dest.state), dest.detail


def cli_listings(home: Path, job: str) -> None:
    """The command line's listings answer with exit 0 and valid JSON."""
    for args in (["nodes"], ["job", "list"], ["job", "status", job]):
        out = subprocess.run(
            [*rdsd_cmd(), *args, "--home", str(home), "--json"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        json.loads(out.stdout)


BAD_VALUES = {
    "time 1e300": {"time": 1e300},
    "time -1e18": {"time": -1e18},
    "time NaN": {"time": math.nan},
    "seq 2^63": {"seq": 2**63, "report_id": f"client1:{2**63}"},
    "state bogus": {"state": "bogus"},
    "wrong package": {"package": "openssl-3.99"},
    "foreign origin": {"origin": "server", "report_id": "server:5"},
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
async def test_a_bad_field_value_is_refused(deployment: Deployment, case: str) -> None:
    """The client signs each report with its own key: only the value is
    wrong. Nothing changes, the session goes on, the listings work, another
    child is served."""
    pid = add_package(deployment, "tool")
    async with running(deployment.server) as (server,):
        c1 = deployment.add_node("client1", Role.CLIENT, server.address)
        bystander = deployment.add_node("bystander", Role.CLIENT, server.address)
        with deployment.admin() as admin:
            job = admin.create_job("install", pid, ["client1"])
        async with running(bystander):
            raw = await RawChild.connect(server.address, c1.home)
            try:
                await raw.handshake("client1", purpose="session")
                bad = dataclasses.replace(report(job, pid, 5, "waiting"), **BAD_VALUES[case])  # type: ignore[arg-type]
                await send_report(raw, raw.sign(bad))
                await still_open(raw)
                assert state_of(deployment, job) == ("waiting", "")
                with deployment.admin() as admin:
                    row = admin.db.node("client1")
                    assert row is not None and row.last_seen is not None
                    assert row.last_seen <= time.time() + 1
                    assert admin.db.installed() == {}
                listings_work(deployment.server.home)
                # A good report afterwards is still taken.
                await send_report(raw, raw.sign(report(job, pid, 6, "transferring")))
                assert state_of(deployment, job)[0] == "transferring"
                await bystander_served(deployment, server, pid)
            finally:
                await raw.close()
        cli_listings(deployment.server.home, job)


async def test_a_huge_detail_is_cut_and_escaped(deployment: Deployment) -> None:
    """A 200,000-character detail with control characters is stored (and
    logged) bounded and escaped."""
    pid = add_package(deployment, "tool")
    async with running(deployment.server) as (server,):
        c1 = deployment.add_node("client1", Role.CLIENT, server.address)
        with deployment.admin() as admin:
            job = admin.create_job("install", pid, ["client1"])
        raw = await RawChild.connect(server.address, c1.home)
        try:
            await raw.handshake("client1", purpose="session")
            detail = "\x1b[2J\nFAKE LOG LINE " + "x" * 200_000
            await send_report(raw, raw.sign(report(job, pid, 5, "failed", detail=detail)))
            state, stored = state_of(deployment, job)
            assert state == "failed"
            assert len(stored) == MAX_DETAIL
            assert stored.startswith("\\x1b[2J\\nFAKE LOG LINE")
            assert "\n" not in stored and "\x1b" not in stored
        finally:
            await raw.close()
        cli_listings(deployment.server.home, job)


async def test_unsigned_and_forged_reports_are_refused(deployment: Deployment) -> None:
    """A relay forwards a node's report; it cannot make one. The node sits
    below the relay by its own genuine claim; the relay's report for it,
    unsigned, signed with the relay's key, or genuine but altered, changes
    nothing. The node's own genuine report, carried by the same relay, is
    applied."""
    pid = add_package(deployment, "tool")
    async with running(deployment.server) as (server,):
        relay_cfg = deployment.add_node("relay1", Role.RELAY, server.address)
        victim = deployment.add_node("victim", Role.CLIENT, server.address)
        bystander = deployment.add_node("bystander", Role.CLIENT, server.address)
        victim_key = ClaimSigner.from_file(victim.paths.key)
        with deployment.admin() as admin:
            job = admin.create_job("install", pid, ["victim"])
        async with running(bystander):
            raw = await RawChild.connect(server.address, relay_cfg.home)
            try:
                await raw.handshake("relay1", role="relay", purpose="session")
                claim = victim_key.attach("victim", "client", "relay1", time.time_ns(), time.time())
                await raw.send(Topology(nodes={"victim": claim}, reset=True))
                with deployment.admin() as admin:
                    await wait_routed(admin, "victim", "relay1")
                installing = report(job, pid, 10, "installing", node="victim")
                installed = report(job, pid, 11, "installed", node="victim")
                await send_report(raw, installing)  # unsigned
                await send_report(raw, raw.sign(installing))  # the relay's key
                genuine = victim_key.report(installing)
                await send_report(raw, dataclasses.replace(genuine, detail="tampered"))
                await send_report(raw, dataclasses.replace(victim_key.report(installed), seq=12))
                await still_open(raw)
                assert state_of(deployment, job, "victim") == ("waiting", "")
                await send_report(raw, genuine)
                await send_report(raw, victim_key.report(installed))
                assert state_of(deployment, job, "victim")[0] == "installed"
                await bystander_served(deployment, server, pid)
            finally:
                await raw.close()


async def test_a_report_cannot_undo_an_outcome_or_reopen_a_cancel(deployment: Deployment) -> None:
    """A node's own signed report that no run of the node could make after
    what it reported before (back to transferring, or failed, once
    installed) or that would put a cancelled destination back to work is
    acknowledged and dropped. (``installed`` arriving before the
    ``installing`` it followed is not such a report: reports can overtake
    each other, see ``domain.can_report``.)"""
    pid = add_package(deployment, "tool")
    async with running(deployment.server) as (server,):
        c1 = deployment.add_node("client1", Role.CLIENT, server.address)
        with deployment.admin() as admin:
            job = admin.create_job("install", pid, ["client1"])
            cancelled = admin.create_job("install", pid, ["client1"], at=time.time() + 3600)
            admin.cancel(cancelled)
        raw = await RawChild.connect(server.address, c1.home)
        try:
            await raw.handshake("client1", purpose="session")
            await send_report(raw, raw.sign(report(job, pid, 5, "installing")))
            await send_report(raw, raw.sign(report(job, pid, 6, "installed")))
            await send_report(raw, raw.sign(report(job, pid, 7, "transferring")))
            await send_report(raw, raw.sign(report(job, pid, 8, "failed", detail="no")))
            assert state_of(deployment, job)[0] == "installed"
            for seq, state in ((9, "transferring"), (10, "installing"), (11, "waiting")):
                await send_report(raw, raw.sign(report(cancelled, pid, seq, state)))
            assert state_of(deployment, cancelled)[0] == "cancelled"
            await still_open(raw)
        finally:
            await raw.close()


async def test_replayed_reports_change_nothing(deployment: Deployment) -> None:
    """A node's genuine reports sent again, or an older one after a newer,
    change nothing: the seq of each origin only grows."""
    pid = add_package(deployment, "tool")
    async with running(deployment.server) as (server,):
        c1 = deployment.add_node("client1", Role.CLIENT, server.address)
        with deployment.admin() as admin:
            job = admin.create_job("install", pid, ["client1"])
        raw = await RawChild.connect(server.address, c1.home)
        try:
            await raw.handshake("client1", purpose="session")
            transferring = raw.sign(report(job, pid, 5, "transferring"))
            failed = raw.sign(report(job, pid, 6, "failed", detail="exit 1"))
            await send_report(raw, transferring)
            await send_report(raw, failed)
            with deployment.admin() as admin:
                admin.retry(job)
            await send_report(raw, failed)
            await send_report(raw, transferring)
            assert state_of(deployment, job) == ("waiting", "retry")
        finally:
            await raw.close()


async def test_holdings_with_an_absurd_expiry_are_refused(deployment: Deployment) -> None:
    """A relay's HOLDINGS with an expiry of 1e300 (or NaN, or before 2000)
    records nothing for those packages; ``rdsd nodes`` still works."""
    pid = add_package(deployment, "tool")
    async with running(deployment.server) as (server,):
        relay_cfg = deployment.add_node("relay1", Role.RELAY, server.address)
        with deployment.admin() as admin:
            job = admin.create_job("transfer", pid, ["relay1"])
        raw = await RawChild.connect(server.address, relay_cfg.home)
        try:
            await raw.handshake("relay1", role="relay", purpose="session")
            soon = time.time() + 3600
            await raw.send(
                Holdings(packages={pid: 1e300, "a-1": math.nan, "b-1": -5.0, "c-1": soon})
            )
            await still_open(raw)
            with deployment.admin() as admin:
                assert admin.db.holdings() == {"relay1": {"c-1": soon}}
        finally:
            await raw.close()
        listings_work(deployment.server.home)
        cli_listings(deployment.server.home, job)
