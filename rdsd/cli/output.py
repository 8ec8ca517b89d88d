"""What every command prints, one way: one JSON document or an aligned
table on stdout, and errors as one line on stderr."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..errors import RdsdError
from ..util.logs import configure

T = TypeVar("T")


def print_json(doc: Any) -> None:
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")


def table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def listing(
    as_json: bool,
    items: Sequence[T],
    header: list[str],
    row: Callable[[T], list[str]],
    doc: Any = None,
) -> None:
    """What every list command does: one JSON document, or an aligned table."""
    if as_json:
        print_json(items if doc is None else doc)
    else:
        table([row(item) for item in items], header)


def run_cli(prog: str, args: argparse.Namespace) -> int:
    """Shared by rdsd and rdsft: dispatch, and turn rdsd's errors into one
    line on stderr and exit status 1."""
    fn: Callable[[argparse.Namespace], int] = args.fn
    # Commands print their results on stdout; library events are for the
    # daemon's log, so here only warnings and errors show, on stderr.
    configure("console", "warning")
    # Past a file-size limit a write should fail with EFBIG (which the store
    # turns into a clean "disk full" failure), not kill the process.
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        return fn(args)
    except (RdsdError, OSError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
