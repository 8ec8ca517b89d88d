"""The supervisor of one install command: it outlives the daemon.

The daemon starts this file as a script (``python supervise.py ...``, in a
session of its own, without importing rdsd, so it starts fast and depends on
nothing but the standard library). It holds the job's run lock and the
package's install lock, which the daemon took before starting it and handed
over as inherited descriptors, for as long as it lives; it runs the install command in a process
group of its own, waits for it and writes the outcome atomically to the
exit file next to the log. So whatever happens to the daemon (kill -9 included), the
command's real exit status is on disk when it ends, and a daemon that starts
again finds either a live supervisor to wait for or the outcome.

Exit file (JSON): ``{"code": N}`` when the command ended by itself (a signal
is a negative code), ``{"timeout": SECONDS}`` when it outlived its timeout
and was killed, ``{"stopped": SIGNAL}`` when the node stopped it (SIGTERM to
the supervisor), ``{"error": "..."}`` when it could not start.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

#: The umask install commands run with: the daemon's own is 0o077 (its
#: files are private), which would make what a command installs unreadable.
INSTALL_UMASK = 0o022


def write_outcome(path: Path, outcome: dict[str, Any]) -> None:
    """Write ``outcome`` so a reader sees no file or the whole one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(outcome).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def supervise(
    command: list[str], cwd: str, log: Path, exit_path: Path, timeout: float
) -> dict[str, Any]:
    stopped = threading.Event()
    proc: subprocess.Popen[bytes] | None = None

    def on_term(signum: int, frame: object) -> None:
        stopped.set()
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # The install log is private to the node's owner, like everything in
    # the home; the install command itself runs with the conventional umask,
    # so what it installs for everyone is readable by everyone.
    with os.fdopen(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as out:
        try:
            proc = subprocess.Popen(
                command,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                process_group=0,
                umask=INSTALL_UMASK,
            )
        except OSError as exc:
            return {"error": f"install command could not start: {exc}"}
    if stopped.is_set():  # SIGTERM landed before proc was known
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return {"timeout": timeout}
    if stopped.is_set() and code < 0:
        return {"stopped": signal.SIGTERM.value, "code": code}
    return {"code": code}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rdsd-supervise")
    p.add_argument("--cwd", required=True)
    p.add_argument("--log", required=True, type=Path)
    p.add_argument("--exit", required=True, type=Path)
    p.add_argument("--timeout", required=True, type=float)
    p.add_argument("--lock-fd", type=int, action="append", default=[])
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    # The locks (the job's run lock, the package's install lock) stay held
    # through these descriptors until this process ends; the install command
    # must not inherit them (it could outlive us).
    for fd in args.lock_fd:
        os.set_inheritable(fd, False)
    outcome = supervise(command, args.cwd, args.log, args.exit, args.timeout)
    write_outcome(args.exit, outcome)
    return 0


if __name__ == "__main__":
    sys.exit(main())
