"""The optional pacing fields: written only when used, so a peer that
predates them sees the very same frames as before unless a job or a node
has a limit or a window."""

from __future__ import annotations

from typing import Any

import pytest

from protocol import Fetch, JobAnnounce, JobNotice, RemoteProtocolError
from protocol.messages import from_wire, to_wire


def notice(**extra: Any) -> JobNotice:
    return JobNotice(job="j1", type="install", package="tool-1.0", destinations=["c1"], **extra)


def test_left_out_at_their_default() -> None:
    assert "rate" not in to_wire(Fetch(fetch_id=1, package="tool-1.0"))[1]
    fields = to_wire(notice())[1]
    assert "rate" not in fields and "windows" not in fields


@pytest.mark.parametrize(
    "msg",
    [
        Fetch(fetch_id=1, package="tool-1.0", rate=1e6),
        notice(rate=2e6, windows=["22:00-06:00"]),
        JobAnnounce(
            job="j1",
            type="install",
            package="tool-1.0",
            destinations=["c1"],
            origin="r1",
            rate=5.0,
            windows=["01:00-02:00", "03:00-04:00"],
        ),
    ],
)
def test_round_trip(msg: Fetch | JobNotice | JobAnnounce) -> None:
    assert from_wire(to_wire(msg), bytes(msg.payload)) == msg


def test_types_checked() -> None:
    with pytest.raises(RemoteProtocolError, match="rate"):
        from_wire([6, {"fetch_id": 1, "package": "tool-1.0", "rate": "fast"}], b"")
    with pytest.raises(RemoteProtocolError, match="windows"):
        from_wire(
            [3, {"job": "j", "type": "install", "package": "tool-1.0", "destinations": [],
                 "windows": [1]}],
            b"",
        )  # fmt: skip
