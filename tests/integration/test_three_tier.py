"""Install jobs end to end over real TLS sockets on 127.0.0.1.

Topology: server -> relay1 -> client1, and client2 directly under the
server. The install script records its environment and copies the payload,
so the tests can check the command saw the right variables and the intact
bytes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from rdsd.domain import Role
from tests.helpers import Deployment, running, wait_routed, wait_state


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_install_through_relay_and_directly(
    deployment: Deployment, package_src: Path, install_out: Path
) -> None:
    with deployment.admin() as admin:
        pid = admin.add_package(package_src, "tool", "1.0", install="sh install.sh")
    async with running(deployment.server) as (server,):
        relay_cfg = deployment.add_node("relay1", Role.RELAY, server.address)
        async with running(relay_cfg) as (relay,):
            c1 = deployment.add_node("client1", Role.CLIENT, relay.address)
            c2 = deployment.add_node("client2", Role.CLIENT, server.address)
            async with running(c1, c2):
                with deployment.admin() as admin:
                    await wait_routed(admin, "client1", "relay1")
                    job = admin.create_job("install", pid, ["client1", "client2"])
                    assert (
                        await wait_state(admin, job, "client1", {"installed", "failed"})
                        == "installed"
                    )
                    assert (
                        await wait_state(admin, job, "client2", {"installed", "failed"})
                        == "installed"
                    )
                    nodes = {n["name"]: n for n in admin.nodes()}
    for name in ("client1", "client2"):
        env = dict(
            line.split("=", 1) for line in (install_out / name / "env.txt").read_text().splitlines()
        )
        assert env["node"] == name
        assert env["package"] == "tool"
        assert env["version"] == "1.0"
        assert env["job"] == job
        assert digest(install_out / name / "payload.bin") == digest(package_src / "payload.bin")
    assert nodes["client1"]["via"] == "relay1"
    assert "tool-1.0" in nodes["client1"]["installed"]
