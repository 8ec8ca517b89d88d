"""How a node's limits and windows are listed for ``rdsd nodes``,
``rdsd reload`` and ``rdsft status``: what matters for each role."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rdsd.admin.ops import limits_listing, limits_text
from rdsd.config import NodeConfig
from rdsd.domain import Role


def test_limits_by_role(tmp_path: Path) -> None:
    base = NodeConfig(home=tmp_path, role=Role.RELAY, name="r1", parent=("h", 1), listen=("h", 2))
    cfg = replace(
        base,
        download_rate=12.5e6,
        per_child_rate=1e6,
        transfer_windows=((1320, 360),),
        install_windows=((60, 300),),
    )
    listed = limits_listing(cfg)
    assert listed == {
        "download_rate": 12.5e6,
        "upload_rate": None,
        "per_child_rate": 1e6,
        "transfer_windows": ["22:00-06:00"],
        "install_windows": ["01:00-05:00"],
    }
    assert limits_text(listed, Role.RELAY) == (
        "download 12500kB/s; upload unlimited, per child 1MB/s; transfer windows 22:00-06:00"
    )
    assert limits_text(listed, Role.SERVER) == "upload unlimited, per child 1MB/s"
    assert limits_text(listed, Role.CLIENT) == (
        "download 12500kB/s; transfer windows 22:00-06:00; install windows 01:00-05:00"
    )
