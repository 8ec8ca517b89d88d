"""``util.fsutil.loose_modes``: what in a home group or others may use."""

from __future__ import annotations

import os
from pathlib import Path

from rdsd.util.fsutil import atomic_write, loose_modes


def test_private_home_has_nothing_loose(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    (home / "store").mkdir(mode=0o700)
    atomic_write(home / "store" / "a.env", b"x")
    assert loose_modes(home) == []


def test_loose_entries_are_named_with_their_modes(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o755)
    (home / "state.db").write_bytes(b"")
    (home / "state.db").chmod(0o644)
    (home / "store").mkdir(mode=0o700)
    (home / "store" / "p.pkg").write_bytes(b"")
    (home / "store" / "p.pkg").chmod(0o640)
    deep = home / "work" / "job" / "extract"
    deep.mkdir(parents=True)
    (home / "work").chmod(0o700)
    (home / "work" / "job").chmod(0o700)
    deep.chmod(0o755)  # three levels down: an extracted package's own modes
    os.symlink("/etc", home / "link")
    found = {str(p.relative_to(tmp_path)): mode for p, mode in loose_modes(home)}
    assert found == {"home": 0o755, "home/state.db": 0o644, "home/store/p.pkg": 0o640}


def test_atomic_write_is_private_by_default(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "f", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o600
