"""What ``rdsd job wait`` shows while it waits.

On a terminal, a live view drawn with ``rich``: one bar per destination, or
for a large job (more than ``MANY`` destinations) one bar over all of them
with counts per state. Elsewhere (a pipe, a log file, CI) one plain line
per state change, so the output can be read by a person and by ``grep``.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import TYPE_CHECKING, Any

from ..admin.watch import Change, WaitOutcome

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

# ``rich`` is imported by what draws (the live view on a terminal), not at
# the top: ``rdsd job status`` prints with the helpers below, and every
# ``rdsd`` command imports this module.

# Above this many destinations, one aggregate bar instead of one per node.
MANY = 20

_STYLE = {
    "waiting": "dim",
    "transferring": "cyan",
    "installing": "yellow",
    "installed": "green",
    "stored": "green",
    "offered": "green",
    "failed": "bold red",
    "cancelled": "magenta",
}


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_rate(rate: float | None) -> str:
    return "-" if rate is None else f"{human_bytes(rate)}/s"


def human_eta(eta: float | None) -> str:
    if eta is None:
        return "-"
    s = round(eta)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def totals(dests: list[dict[str, Any]]) -> tuple[int, int, float | None, float | None]:
    """Bytes done and total, summed rate and ETA over transferring destinations."""
    moving = [d for d in dests if d.get("bytes_total") is not None]
    done = sum(int(d["bytes_done"]) for d in moving)
    total = sum(int(d["bytes_total"]) for d in moving)
    rates = [float(d["rate"]) for d in moving if d.get("rate") is not None]
    rate = sum(rates) if rates else None
    eta = (total - done) / rate if rate else None
    return done, total, rate, eta


class LiveView:
    """The terminal view; ``update`` redraws it from a job status."""

    def __init__(self, console: Console | None = None) -> None:
        from rich.console import Console
        from rich.live import Live

        self.console = console or Console()
        self.live = Live(console=self.console, auto_refresh=False, transient=False)

    def __enter__(self) -> LiveView:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(None, None, None)

    def update(self, status: dict[str, Any], moved: list[Change]) -> None:
        self.live.update(render(status), refresh=True)


def render(status: dict[str, Any]) -> RenderableType:
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    dests: list[dict[str, Any]] = status["destinations"]
    head = Text(f"job {status['id']}: {status['type']} {status['package']}", style="bold")
    if len(dests) > MANY:
        return Group(head, _aggregate(dests))
    table = Table(box=None, pad_edge=False)
    for col in ("NODE", "STATE", "", "BYTES", "RATE", "ETA", "DETAIL"):
        table.add_column(col)
    for d in dests:
        state = d["state"]
        total = d.get("bytes_total")
        if total:
            bar = ProgressBar(total=total, completed=d["bytes_done"], width=24)
            size = f"{human_bytes(d['bytes_done'])} / {human_bytes(total)}"
        else:
            final = state not in ("waiting", "transferring", "installing")
            bar = ProgressBar(total=1, completed=1 if final else 0, width=24)
            size = "-"
        table.add_row(
            d["node"],
            Text(state, style=_STYLE.get(state, "")),
            bar,
            size,
            human_rate(d.get("rate")),
            human_eta(d.get("eta")),
            Text(human_detail(d["detail"]), overflow="ellipsis", no_wrap=True),
        )
    return Group(head, table)


def _aggregate(dests: list[dict[str, Any]]) -> RenderableType:
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    counts = Counter(d["state"] for d in dests)
    final = sum(n for s, n in counts.items() if s not in ("waiting", "transferring", "installing"))
    done, total, rate, eta = totals(dests)
    line = Text.assemble(
        *(
            item
            for s, n in sorted(counts.items())
            for item in ((f"{s}", _STYLE.get(s, "")), (f"={n}  ", ""))
        )
    )
    grid = Table.grid(padding=(0, 2))
    grid.add_row(
        ProgressBar(total=len(dests), completed=final, width=40),
        f"{final}/{len(dests)} final",
    )
    grid.add_row(line, "")
    grid.add_row(
        f"transferring: {human_bytes(done)} of {human_bytes(total)}",
        f"{human_rate(rate)}  ETA {human_eta(eta)}",
    )
    return grid


def human_detail(detail: str) -> str:
    """The human part of a progress detail; the ``[bytes ...]`` suffix is
    for programs."""
    cut = detail.rfind(" [bytes ")
    return detail[:cut] if cut >= 0 and detail.endswith("]") else detail


def print_changes(status: dict[str, Any], moved: list[Change]) -> None:
    """One line per state change, for a non-terminal."""
    for c in moved:
        detail = human_detail(c.detail)
        print(f"{c.node} {c.state}{': ' + detail if detail else ''}", flush=True)


def summary(status: dict[str, Any], outcome: WaitOutcome, timeout: float | None) -> str:
    counts = Counter(d["state"] for d in status["destinations"])
    states = ", ".join(f"{s}={n}" for s, n in sorted(counts.items()))
    if outcome is WaitOutcome.TIMED_OUT:
        return f"job {status['id']}: not finished after {timeout:g}s ({states})"
    word = "succeeded" if outcome is WaitOutcome.SUCCEEDED else "finished with failures"
    return f"job {status['id']}: {word} ({states})"


def is_terminal() -> bool:
    return sys.stdout.isatty()
