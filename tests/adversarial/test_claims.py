"""Attacks on routes and identity (part 1 of the trust requirements): a relay
claiming nodes it does not hold, inventing names, replaying claims, and
certificates the server never issued. Real daemons on loopback; the attacker
is a ``RawChild`` with a real, enrolled certificate."""

from __future__ import annotations

import time

from protocol import (
    Error,
    ErrorCode,
    Fetch,
    FetchEnd,
    FetchFail,
    Hello,
    Holdings,
    Presence,
    Report,
    Topology,
)
from rdsd.claims import ClaimSigner
from rdsd.config import HomePaths
from rdsd.domain import Role
from rdsd.security import issue_certificate
from rdsd.util.fsutil import atomic_write
from tests.adversarial.trust import (
    add_package,
    bystander_served,
    drain,
    listings_work,
    notices_for,
    send_report,
    still_open,
)
from tests.helpers import (
    Deployment,
    RawChild,
    enroll_node,
    running,
    wait_child,
    wait_routed,
    wait_state,
)


async def test_a_relay_cannot_take_over_an_offline_node(deployment: Deployment) -> None:
    """A relay lists an enrolled node that is offline, with a claim it signed
    itself: no route, no notice, no fetch, no fake ``installed``; the real
    node later gets its job; another child is served throughout."""
    pid = add_package(deployment, "tool")
    async with running(deployment.server) as (server,):
        relay_cfg = deployment.add_node("relay1", Role.RELAY, server.address)
        victim_cfg = deployment.add_node("victim", Role.CLIENT, server.address)
        bystander_cfg = deployment.add_node("bystander", Role.CLIENT, server.address)
        with deployment.admin() as admin:
            job = admin.create_job("install", pid, ["victim"])
        async with running(bystander_cfg):
            raw = await RawChild.connect(server.address, relay_cfg.home)
            try:
                await raw.handshake("relay1", role="relay", purpose="session")
                forged = raw.attach("victim", "client", parent="relay1")  # relay1's own key
                await raw.send(Topology(nodes={"victim": forged}, reset=True))
                await raw.send(Presence(online={"victim": forged}, reset=True))
                got = await drain(raw, 1.5)
                assert notices_for(got, job) == [], "a notice went to the relay"
                await raw.send(Fetch(fetch_id=1, package=pid))
                answer = [m for m in await drain(raw, 2.0) if isinstance(m, FetchFail | FetchEnd)]
                assert answer and isinstance(answer[0], FetchFail), answer
                for origin in ("victim", "relay1"):
                    await send_report(
                        raw,
                        raw.sign(
                            Report(
                                report_id=f"{origin}:9", job=job, node="victim",
                                state="installed", seq=9, package=pid, time=time.time(),
                                origin=origin,
                            )
                        ),
                    )  # fmt: skip
                await still_open(raw)
                with deployment.admin() as admin:
                    row = admin.db.node("victim")
                    assert row is not None and row.via is None
                    assert admin.job_status(job)["destinations"][0]["state"] == "waiting"
                    assert not any(n["name"] == "victim" and n["online"] for n in admin.nodes())
                await bystander_served(deployment, server, pid)
            finally:
                await raw.close()
        async with running(victim_cfg):
            with deployment.admin() as admin:
                await wait_state(admin, job, "victim", {"installed"}, timeout=30)


async def test_a_relay_cannot_invent_a_node(deployment: Deployment) -> None:
    """Unknown names in TOPOLOGY and PRESENCE are never created; the names
    it did not invent are untouched and another child is served."""
    pid = add_package(deployment, "tool")
    async with running(deployment.server) as (server,):
        relay_cfg = deployment.add_node("relay1", Role.RELAY, server.address)
        bystander_cfg = deployment.add_node("bystander", Role.CLIENT, server.address)
        async with running(bystander_cfg):
            raw = await RawChild.connect(server.address, relay_cfg.home)
            try:
                await raw.handshake("relay1", role="relay", purpose="session")
                ghosts = {
                    name: raw.attach(name, role, parent="relay1")
                    for name, role in (("ghost", "client"), ("ghost-relay", "relay"))
                }
                await raw.send(Topology(nodes=ghosts, reset=True))
                await raw.send(Presence(online=ghosts, reset=True))
                await raw.send(Holdings(packages={pid: time.time() + 3600}))
                await still_open(raw)
                with deployment.admin() as admin:
                    assert admin.db.node("ghost") is None
                    assert admin.db.node("ghost-relay") is None
                    assert {n["name"] for n in admin.nodes()} == {"relay1", "bystander"}
                await bystander_served(deployment, server, pid)
            finally:
                await raw.close()


async def test_a_replayed_attach_claim_is_refused(deployment: Deployment) -> None:
    """A genuine claim of the node, made when it was under the relay, is
    refused once the node has said something newer (here: it connected to
    the server directly); the relay gets no route and no notice."""
    pid = add_package(deployment, "tool")
    async with running(deployment.server) as (server,):
        relay_cfg = deployment.add_node("relay1", Role.RELAY, server.address)
        victim_cfg = deployment.add_node("victim", Role.CLIENT, server.address)
        victim_key = ClaimSigner.from_file(victim_cfg.paths.key)
        old = victim_key.attach("victim", "client", "relay1", 1, time.time() - 60)
        async with running(victim_cfg):
            await wait_child(server, "victim")
        await wait_child(server, "victim", present=False)
        with deployment.admin() as admin:
            job = admin.create_job("install", pid, ["victim"])
        raw = await RawChild.connect(server.address, relay_cfg.home)
        try:
            await raw.handshake("relay1", role="relay", purpose="session")
            await raw.send(Topology(nodes={"victim": old}, reset=True))
            assert notices_for(await drain(raw, 1.5), job) == []
            with deployment.admin() as admin:
                row = admin.db.node("victim")
                assert row is not None and row.via != "relay1"
        finally:
            await raw.close()
        # The same claim counted as newest would have been believed: it is
        # the counter, not the relay's word, that decides.
        fresh = victim_key.attach("victim", "client", "relay1", time.time_ns(), time.time())
        raw = await RawChild.connect(server.address, relay_cfg.home)
        try:
            await raw.handshake("relay1", role="relay", purpose="session")
            await raw.send(Topology(nodes={"victim": fresh}, reset=True))
            with deployment.admin() as admin:
                await wait_routed(admin, "victim", "relay1")
            assert notices_for(await drain(raw, 3.0), job)
        finally:
            await raw.close()


async def test_a_certificate_never_enrolled_is_refused(deployment: Deployment) -> None:
    """A certificate our own CA signed for a name the server never enrolled,
    and a node's old certificate after it was enrolled again, are refused at
    HELLO; neither name is created; another child is served meanwhile. A
    relay, which cannot tell, lets the stranger in, but the server never
    routes to it."""
    pid = add_package(deployment, "tool")
    srv = HomePaths(deployment.server.home)
    stranger = HomePaths(deployment.root / "stranger")
    stranger.tls.mkdir(parents=True)
    cert, key, _ = issue_certificate(
        srv.ca_cert.read_bytes(), srv.ca_key.read_bytes(), "stranger", "client"
    )
    atomic_write(stranger.cert, cert)
    atomic_write(stranger.key, key, mode=0o600)
    atomic_write(stranger.ca_cert, srv.ca_cert.read_bytes())
    async with running(deployment.server) as (server,):
        relay_cfg = deployment.add_node("relay1", Role.RELAY, server.address)
        bystander_cfg = deployment.add_node("bystander", Role.CLIENT, server.address)
        old = deployment.add_node("laptop", Role.CLIENT, server.address)
        old_home = deployment.root / "laptop-old"
        old.home.rename(old_home)
        enroll_node(deployment, "laptop", Role.CLIENT)  # a lost bundle, re-issued
        async with running(bystander_cfg, relay_cfg) as (_, relay):
            for home, name in ((stranger.home, "stranger"), (old_home, "laptop")):
                raw = await RawChild.connect(server.address, home)
                try:
                    await raw.send(raw_hello(raw, name))
                    answer = await raw.recv()
                    assert isinstance(answer, Error), answer
                    assert answer.code == ErrorCode.UNAUTHORIZED, answer
                finally:
                    await raw.close()
            raw = await RawChild.connect(relay.address, stranger.home)
            try:
                await raw.handshake("stranger", purpose="session")
                await wait_child(relay, "stranger")
                await still_open(raw)
                await bystander_served(deployment, server, pid)
                with deployment.admin() as admin:
                    assert admin.db.node("stranger") is None
                    laptop = admin.db.node("laptop")
                    assert laptop is not None and laptop.via is None
            finally:
                await raw.close()
        listings_work(deployment.server.home)


def raw_hello(raw: RawChild, name: str) -> Hello:
    """A proper HELLO for ``name``, claim and all (only the certificate is wrong)."""
    return Hello(node=name, role="client", purpose="session", attach=raw.attach(name))


async def test_unsigned_and_foreign_attach_claims_are_refused_at_hello(
    deployment: Deployment,
) -> None:
    """A HELLO without a claim, or with one signed by another key or naming
    another parent, is refused with UNAUTHORIZED, and the server goes on."""
    async with running(deployment.server) as (server,):
        c1 = deployment.add_node("client1", Role.CLIENT, server.address)
        relay = deployment.add_node("relay1", Role.RELAY, server.address)
        other = ClaimSigner.from_file(relay.paths.key)
        for attach in (
            b"",
            other.attach("client1", "client", "server", time.time_ns(), time.time()),
            None,  # client1's own key, but naming another parent
        ):
            raw = await RawChild.connect(server.address, c1.home)
            try:
                claim = raw.attach("client1", parent="relay9") if attach is None else attach
                await raw.send(Hello(node="client1", role="client", attach=claim))
                answer = await raw.recv()
                assert isinstance(answer, Error) and answer.code == ErrorCode.UNAUTHORIZED
            finally:
                await raw.close()
        raw = await RawChild.connect(server.address, c1.home)
        try:
            await raw.handshake("client1")  # its own claim: welcomed
        finally:
            await raw.close()
