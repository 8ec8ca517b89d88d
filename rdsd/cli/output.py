"""What every command prints, one way: one JSON document or an aligned
table on stdout, and errors as one line on stderr.

Exit statuses, the same for ``rdsd`` and ``rdsft``:

- 0: done.
- 1: refused or failed: the request was understood but cannot be done here
  (an unknown package, a job still using it, a parent that refuses us).
- 2: usage: the command line is wrong (argparse), or a value in it, in the
  home's ``rdsd.toml`` or given to the admin API is malformed or out of
  range (``ConfigError``). Both print one line naming what is wrong and
  what is allowed.
- 70: an internal error (a bug): one line on stderr and the full trace in a
  file whose path the line gives (``TMPDIR/rdsd-error-*.txt``, mode 0600).
- 130: interrupted (Ctrl-C); 141: the reader of stdout went away (``| head``),
  which, as for any Unix filter, is not an error worth a message.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

from ..errors import ConfigError, RdsdError
from ..util.logs import configure_on_import

#: Files and directories rdsd creates are for their owner only.
PRIVATE_UMASK = 0o077
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70  # EX_SOFTWARE in sysexits.h
EXIT_INTERRUPTED = 130
EXIT_PIPE = 141  # what a shell reports for a filter killed by SIGPIPE

T = TypeVar("T")


def print_json(doc: Any) -> None:
    """Indented for a person at a terminal; one compact line for a program
    (the standard library encodes that in C: a 10,000-destination status is
    0.03 s instead of 0.4 s indented)."""
    if sys.stdout.isatty():
        json.dump(doc, sys.stdout, indent=2)
    else:
        sys.stdout.write(json.dumps(doc, separators=(",", ":")))
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


class VersionAction(argparse.Action):
    """``--version``: ``PROG VERSION`` on stdout, exit 0, as argparse's own
    action prints it, with the version looked up only when asked for."""

    def __init__(
        self,
        option_strings: Sequence[str],
        dest: str = argparse.SUPPRESS,
        default: str = argparse.SUPPRESS,
        help: str = "show program's version number and exit",
    ) -> None:
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> NoReturn:
        from .. import __version__

        parser._print_message(f"{parser.prog} {__version__}\n", sys.stdout)
        parser.exit()


class Parser(argparse.ArgumentParser):
    """argparse with the one-line error rule: a usage error is one line on
    stderr (no usage block above it) with a pointer to ``--help``, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _silence_stdout() -> None:
    """The reader of stdout is gone: point stdout at /dev/null so the flush
    at interpreter exit does not fail a second time with a traceback."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def write_trace(prog: str, exc: BaseException) -> str:
    """Write ``exc``'s full traceback to a new private file in the temp
    directory and return its path. The temp directory, not the home: the
    error may be that the home cannot be written, and this must not fail."""
    import tempfile  # here, with traceback: only a bug needs them
    import traceback

    fd, path = tempfile.mkstemp(prefix=f"{prog}-error-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write(f"{prog} {' '.join(sys.argv[1:])}\n")
        f.write(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
        f.write("".join(traceback.format_exception(exc)))
    return path


def run_cli(prog: str, args: argparse.Namespace) -> int:
    """Shared by rdsd and rdsft: dispatch, and turn every error into one
    line on stderr and the exit status above; no traceback ever reaches
    the person at the terminal."""
    fn: Callable[[argparse.Namespace], int] = args.fn
    # Commands print their results on stdout; library events are for the
    # daemon's log, so here only warnings and errors show, on stderr
    # (configured when a command first reaches code that logs).
    configure_on_import("console", "warning")
    # Everything rdsd writes in a home (keys, the job database and its WAL,
    # packages, envelopes, logs) is its owner's alone; install commands get
    # the conventional umask back (node/supervise.py).
    os.umask(PRIVATE_UMASK)
    # Past a file-size limit a write should fail with EFBIG (which the store
    # turns into a clean "disk full" failure), not kill the process.
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        status = fn(args)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_PIPE
    except ConfigError as exc:
        return _fail(prog, exc, EXIT_USAGE)
    except (RdsdError, OSError) as exc:
        return _fail(prog, exc, EXIT_REFUSED)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        try:
            where = f"the full trace is in {write_trace(prog, exc)}"
        except OSError as io:
            where = f"and its trace could not be written: {io}"
        return _fail(prog, f"internal error: {type(exc).__name__}: {exc}; {where}", EXIT_INTERNAL)


def _fail(prog: str, error: BaseException | str, status: int) -> int:
    """One line on stderr, whatever the message holds."""
    text = " ".join(str(error).split()) or type(error).__name__
    with contextlib.suppress(BrokenPipeError):
        print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
    return status
