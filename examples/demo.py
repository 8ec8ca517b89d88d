#!/usr/bin/env python3
"""A three-tier rdsd deployment on loopback, driven through the CLI.

It sets up a managing server, a relay, one client behind the relay and one
directly under the server; starts their daemons; adds a package whose
install command records what it saw; creates an install job for both
clients; and prints the job's status until both are installed. Everything
lives in a temporary directory (or --dir) and every daemon is stopped at
the end. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RDSD = [sys.executable, "-m", "rdsd.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rdsd(*args: str) -> str:
    out = subprocess.run([*RDSD, *args], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"daemon exited early with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port} after {timeout}s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", help="keep the deployment here instead of a temporary directory")
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()
    base = Path(args.dir).resolve() if args.dir else Path(tempfile.mkdtemp(prefix="rdsd-demo-"))
    if args.dir and base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True, exist_ok=True)
    server, relay = base / "server", base / "relay1"
    sport, rport = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    logs = base / "logs"
    logs.mkdir()

    def start(home: Path) -> subprocess.Popen[bytes]:
        log = (logs / f"{home.name}.log").open("wb")
        proc = subprocess.Popen([*RDSD, "run", "--home", str(home)], stdout=log, stderr=log)
        procs.append(proc)
        return proc

    try:
        print(f"== deployment in {base}")
        print(
            rdsd(
                "init",
                "server",
                "--home",
                str(server),
                "--name",
                "server",
                "--listen",
                f"127.0.0.1:{sport}",
            )
        )
        for name, role in (("relay1", "relay"), ("client1", "client"), ("client2", "client")):
            print(
                rdsd(
                    "enroll",
                    name,
                    "--role",
                    role,
                    "--home",
                    str(server),
                    "--out",
                    str(base / f"{name}.bundle"),
                )
            )
        print(
            rdsd(
                "init",
                "relay",
                "--home",
                str(relay),
                "--bundle",
                str(base / "relay1.bundle"),
                "--parent",
                f"127.0.0.1:{sport}",
                "--listen",
                f"127.0.0.1:{rport}",
            )
        )
        print(
            rdsd(
                "init",
                "client",
                "--home",
                str(base / "client1"),
                "--bundle",
                str(base / "client1.bundle"),
                "--parent",
                f"127.0.0.1:{rport}",
            )
        )
        print(
            rdsd(
                "init",
                "client",
                "--home",
                str(base / "client2"),
                "--bundle",
                str(base / "client2.bundle"),
                "--parent",
                f"127.0.0.1:{sport}",
            )
        )

        src = base / "hello-src"
        src.mkdir()
        (src / "install.sh").write_text(
            "#!/bin/sh\n"
            'echo "installed $RDSD_PACKAGE $RDSD_VERSION on $RDSD_NODE (job $RDSD_JOB)"'
            ' > "$RDSD_PACKAGE_DIR/../hello-installed.txt"\n'
        )
        (src / "payload.bin").write_bytes(os.urandom(5 * 1024 * 1024))
        pid = rdsd(
            "package",
            "add",
            str(src),
            "--name",
            "hello",
            "--version",
            "1.0",
            "--install",
            "sh install.sh",
            "--home",
            str(server),
        )
        print(f"== package {pid}")

        print("== starting daemons")
        wait_listening(sport, start(server))
        wait_listening(rport, start(relay))
        start(base / "client1")
        start(base / "client2")

        job = rdsd(
            "job",
            "create",
            "--type",
            "install",
            "--package",
            pid,
            "--to",
            "client1,client2",
            "--home",
            str(server),
        )
        print(f"== job {job}")
        deadline = time.monotonic() + args.timeout
        status = ""
        while time.monotonic() < deadline:
            status = rdsd("job", "status", job, "--home", str(server))
            lines = status.splitlines()[2:]
            if lines and all(line.split()[1] in ("installed", "failed") for line in lines):
                break
            time.sleep(0.25)
        print(status)
        print("== nodes")
        print(rdsd("nodes", "--home", str(server)))
        ok = all(line.split()[1] == "installed" for line in status.splitlines()[2:])
        print("== demo " + ("succeeded" if ok else f"FAILED (logs in {logs})"))
        return 0 if ok else 1
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
