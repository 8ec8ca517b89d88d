"""Fixtures over tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from rdsd.admin import init_server
from rdsd.config import NodeConfig
from tests.helpers import FAST, Deployment, make_payload_dir


@pytest.fixture
def deployment(tmp_path: Path) -> Deployment:
    init_server(tmp_path / "server", name="server", listen=("127.0.0.1", 0))
    cfg = NodeConfig.load(tmp_path / "server", **FAST)
    return Deployment(root=tmp_path, server=cfg)


@pytest.fixture
def install_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the test install script records what it saw (via the env)."""
    out = tmp_path / "installed"
    out.mkdir()
    monkeypatch.setenv("RDSD_TEST_OUT", str(out))
    return out


@pytest.fixture
def package_src(tmp_path: Path) -> Path:
    return make_payload_dir(tmp_path / "pkgsrc")
