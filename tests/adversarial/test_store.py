"""One bad file in a store never wedges a node.

A relay's store holds an envelope signed by another deployment's key and
an envelope filed under another package's name. Both are set aside to the
home's ``quarantine/`` folder and logged once each with the package and the
reason; the relay goes on: its holdings reach the server, and a job through
it to a client below completes, with the client's report reaching the
server.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from structlog.testing import capture_logs

from rdsd.admin import Admin, init_server
from rdsd.domain import Role
from rdsd.packages.manifest import Envelopes
from rdsd.packages.store import Store
from rdsd.security import Verifier
from tests.helpers import Deployment, running, wait_routed, wait_state, wait_until


def plant(deployment: Deployment, package_src: Path, relay_store: Path) -> None:
    """Put a foreign-signed package and a misfiled envelope in ``relay_store``."""
    foreign = deployment.root / "foreign"
    init_server(foreign, name="foreign", listen=("127.0.0.1", 0))
    with Admin(foreign) as admin:
        rogue = admin.add_package(package_src, "rogue", "1.0", install="sh install.sh")
    relay_store.mkdir(parents=True, exist_ok=True)
    for suffix in (".env", ".pkg"):
        shutil.copy(foreign / "store" / f"{rogue}{suffix}", relay_store / f"{rogue}{suffix}")
    with deployment.admin() as admin:
        tool = admin.add_package(package_src, "tool", "1.0", install="sh install.sh")
    home = deployment.server.home / "store"
    # A genuine envelope, filed under a name that is not its package's.
    shutil.copy(home / f"{tool}.env", relay_store / "other-2.0.env")
    shutil.copy(home / f"{tool}.pkg", relay_store / "other-2.0.pkg")


async def test_bad_envelopes_are_set_aside_and_the_relay_goes_on(
    deployment: Deployment, package_src: Path, install_out: Path
) -> None:
    async with running(deployment.server) as (server,):
        relay_cfg = deployment.add_node("relay1", Role.RELAY, server.address)
        plant(deployment, package_src, relay_cfg.paths.store)
        with capture_logs() as logs:
            async with running(relay_cfg) as (relay,):
                client = deployment.add_node("client1", Role.CLIENT, relay.address)
                async with running(client):
                    with deployment.admin() as admin:
                        await wait_routed(admin, "client1", "relay1")
                        job = admin.create_job("install", "tool-1.0", ["client1"])
                        state = await wait_state(admin, job, "client1", {"installed", "failed"})
                        assert state == "installed"
                        # The relay's holdings still reach the server.
                        await wait_until(
                            lambda: "tool-1.0" in admin.db.holdings("relay1").get("relay1", {}),
                            10,
                            what="the relay's holdings at the server",
                        )
                        held = admin.db.holdings("relay1")["relay1"]
    assert "rogue-1.0" not in held and "other-2.0" not in held
    quarantine = relay_cfg.home / "quarantine"
    moved = sorted(p.name.rsplit(".", 1)[0] for p in quarantine.iterdir())
    assert moved == ["other-2.0.env", "other-2.0.pkg", "rogue-1.0.env", "rogue-1.0.pkg"], moved
    store = relay_cfg.paths.store
    assert not any((store / name).exists() for name in ("rogue-1.0.env", "other-2.0.env"))
    set_aside = [e for e in logs if e["event"] == "store.set_aside"]
    assert sorted(e["package"] for e in set_aside) == ["other-2.0", "rogue-1.0"]
    reasons = {e["package"]: e["reason"] for e in set_aside}
    assert "signature" in reasons["rogue-1.0"]
    assert "not other-2.0" in reasons["other-2.0"]
    assert not [e for e in logs if e["event"] == "loop.error" or e["log_level"] == "critical"]


def test_a_store_reads_past_a_bad_envelope(deployment: Deployment, package_src: Path) -> None:
    """The store itself: listing, lookups and holdings skip the bad entry
    after setting it aside, and a second look finds nothing to log."""
    store_dir = deployment.root / "relay-store" / "store"
    plant(deployment, package_src, store_dir)
    shutil.copy(deployment.server.home / "store" / "tool-1.0.env", store_dir / "tool-1.0.env")
    shutil.copy(deployment.server.home / "store" / "tool-1.0.pkg", store_dir / "tool-1.0.pkg")
    verifier = Verifier(deployment.server.paths.signing_pub.read_bytes())
    store = Store(store_dir, Envelopes(verifier))
    with capture_logs() as logs:
        assert [m.id for m in store.manifests()] == ["tool-1.0"]
        assert store.manifest("rogue-1.0") is None
        assert [m.id for m in store.manifests()] == ["tool-1.0"]
    assert len([e for e in logs if e["event"] == "store.set_aside"]) == 2
    assert len(list((store_dir.parent / "quarantine").iterdir())) == 4
