"""What ``rdsd job wait`` draws on a terminal and prints elsewhere, from a
job status document (no daemon needed)."""

from __future__ import annotations

from typing import Any

import pytest
from rich.console import Console

from rdsd.admin.watch import Change, WaitOutcome, changes, outcome_of
from rdsd.cli import watch


def dest(
    node: str, state: str, done: int | None = None, total: int | None = None
) -> dict[str, Any]:
    moving = done is not None
    return {
        "node": node,
        "state": state,
        "detail": f"50% (x) [bytes {done}/{total}]" if moving else "",
        "updated": None,
        "bytes_done": done,
        "bytes_total": total,
        "rate": 1024.0 * 1024 if moving else None,
        "eta": 42.0 if moving else None,
    }


def status(dests: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": "j1", "type": "install", "package": "app-1.0", "destinations": dests}


def draw(doc: dict[str, Any]) -> str:
    console = Console(record=True, width=160, color_system=None)
    console.print(watch.render(doc))
    return console.export_text()


def test_one_bar_per_destination_for_a_small_job() -> None:
    text = draw(
        status(
            [
                dest("ws-1", "transferring", 5 * 1024 * 1024, 10 * 1024 * 1024),
                dest("ws-2", "installed"),
            ]
        )
    )
    assert "job j1: install app-1.0" in text
    row = next(line for line in text.splitlines() if "ws-1" in line)
    assert "5.0 MiB / 10.0 MiB" in row and "1.0 MiB/s" in row and "42s" in row
    assert "[bytes" not in text  # the machine part stays out of sight
    assert "installed" in next(line for line in text.splitlines() if "ws-2" in line)


def test_aggregate_for_a_large_job() -> None:
    dests = [dest(f"ws-{i}", "installed") for i in range(watch.MANY)]
    dests += [dest("ws-a", "transferring", 1024, 4096), dest("ws-b", "failed")]
    text = draw(status(dests))
    assert "ws-0" not in text
    assert f"{watch.MANY + 1}/{watch.MANY + 2} final" in text
    assert f"installed={watch.MANY}" in text and "failed=1" in text and "transferring=1" in text
    assert "1.0 KiB of 4.0 KiB" in text and "1.0 MiB/s" in text


def test_outcomes_and_changes() -> None:
    assert (
        outcome_of(status([dest("a", "installed"), dest("b", "stored")])) is WaitOutcome.SUCCEEDED
    )
    assert (
        outcome_of(status([dest("a", "installed"), dest("b", "cancelled")])) is WaitOutcome.FAILED
    )
    assert outcome_of(status([dest("a", "failed")])) is WaitOutcome.FAILED
    assert outcome_of(status([dest("a", "installed"), dest("b", "transferring", 1, 2)])) is None
    assert [int(o) for o in WaitOutcome] == [0, 1, 3]
    moved = changes({"a": "waiting"}, status([dest("a", "waiting"), dest("b", "installing")]))
    assert moved == [Change("b", "installing", "", None)]


def test_plain_lines(capsys: pytest.CaptureFixture[str]) -> None:
    doc = status([dest("ws-1", "transferring", 1, 2)])
    watch.print_changes(
        doc, [Change("ws-1", "transferring", doc["destinations"][0]["detail"], "waiting")]
    )
    assert capsys.readouterr().out == "ws-1 transferring: 50% (x)\n"
    assert watch.summary(doc, WaitOutcome.TIMED_OUT, 2.0).startswith(
        "job j1: not finished after 2s"
    )


def test_human_units() -> None:
    assert watch.human_bytes(512) == "512 B"
    assert watch.human_bytes(3 * 1024**3) == "3.0 GiB"
    assert watch.human_eta(59.6) == "1m00s" and watch.human_eta(7300) == "2h01m"
    assert watch.human_rate(None) == "-"
