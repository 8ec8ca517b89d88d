"""The daemon takes what it built at start out of the cyclic collector's walks."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from rdsd.cli.daemon import freeze_startup


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


@pytest.mark.usefixtures("unfrozen")
def test_objects_alive_at_start_are_frozen_and_later_ones_are_not() -> None:
    at_start = [object() for _ in range(10)], {"kept": [1, 2, 3]}
    frozen = freeze_startup()
    assert frozen == gc.get_freeze_count() > 0
    later = {"made": ["after", "start"]}
    # A full collection no longer walks what existed at start, only what came since.
    walked = gc.get_objects(generation=2) + gc.get_objects(generation=1) + gc.get_objects(0)
    assert not any(o is at_start[1] for o in walked)
    assert any(o is later for o in walked)
