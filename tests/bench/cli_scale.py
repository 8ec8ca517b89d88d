#!/usr/bin/env python3
"""Operator commands at fleet size: how long ``rdsd job status``, ``rdsd
nodes``, ``rdsd job list`` and ``rdsft -a`` take on a server that knows
10,000 clients and has one job to all of them.

Run from the repository root, under the shared lock::

    flock /work/bench.lock python tests/bench/cli_scale.py            # 10,000 clients
    flock /work/bench.lock python tests/bench/cli_scale.py --nodes 1000 --repeat 5

The server home is made with the admin API (``init_server``, ``enroll``,
``add_package``, ``create_job``) in a temporary directory (``--dir`` keeps
it). ``--real`` nodes (10 relays and the first clients) are enrolled with
``enroll`` itself, bundle file included; the rest get a certificate from
the deployment's CA exactly as ``enroll`` issues it and the same ``nodes``
row (serial and public key: the allow-list), written in one transaction
without a bundle file, since ``enroll`` costs ~10 ms a node (a bundle
written and fsynced, one commit each) and 10,000 of them would take
minutes. What a running fleet would have added over time is written with
SQL in one transaction, also because 10,000 separate commits would take
minutes: routes (clients under the relays), presence (90 % online),
relays' holdings, and the job's destinations in a mix of states with their
details (installed 60 %, waiting 14 %, transferring 12 % with two progress
points each, installing 6 %, failed 6 %, cancelled 2 %), the ``installed``
inventory, and 30 older finished jobs to 200 clients each.

Each command is run ``--repeat`` times as a subprocess through the
installed ``rdsd``/``rdsft`` scripts (stdout a pipe, as for a program:
``--json`` is compact), after one untimed warm-up run; the table shows the
median and the minimum wall time, next to two baselines measured in the
same run: ``python -c pass`` (the interpreter alone) and ``python -c
"import rdsd.cli.rdsd"`` (what every ``rdsd`` command pays before it does
anything). Python's bytecode is cached as an installed package has it
(``PYTHONPYCACHEPREFIX``, a directory of the run's own); two rows repeat
a measurement with rdsd's sources compiled on every run, as they are where
``PYTHONDONTWRITEBYTECODE`` is set. ``rdsft -a`` runs against a real server
daemon (``rdsd run``) on 127.0.0.1 with nothing pending for the client.
``--before REV`` times the code of an earlier revision too, on the same
home, each command's runs alternating between the two trees, and adds
their ratio. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

THIS = Path(__file__).resolve()
ROOT = THIS.parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rdsd.admin import Admin, enroll, init_node, init_server  # noqa: E402
from rdsd.claims import public_key_der  # noqa: E402
from rdsd.config import HomePaths  # noqa: E402
from rdsd.domain import DestState, JobType, Role, progress_detail  # noqa: E402
from rdsd.security import issue_certificate  # noqa: E402

BIN = Path(sys.executable).parent
#: Taken out of the environment the commands run in (set per run instead).
DROPPED = {"PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX"}
RELAYS = 10
OLD_JOBS = 30
OLD_JOB_SIZE = 200
#: The job's destinations, by state: (state, share).
MIX: list[tuple[DestState, float]] = [
    (DestState.INSTALLED, 0.60),
    (DestState.WAITING, 0.14),
    (DestState.TRANSFERRING, 0.12),
    (DestState.INSTALLING, 0.06),
    (DestState.FAILED, 0.06),
    (DestState.CANCELLED, 0.02),
]
PACKAGE_SIZE = 48 * 1024 * 1024  # what the progress details say the package weighs


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def script(name: str) -> list[str]:
    """The installed console script (what an operator runs), else ``-m``."""
    path = BIN / name
    if path.exists():
        return [str(path)]
    return [sys.executable, "-m", "rdsd.cli" if name == "rdsd" else "rdsd.cli.rdsft"]


def client_name(i: int) -> str:
    return f"c{i:05d}"


# -- the server home ----------------------------------------------------------------------


def build(root: Path, nodes: int, real: int) -> tuple[Path, str, list[str]]:
    """The server home with ``nodes`` clients; returns (home, the big job,
    the client names)."""
    home = root / "server"
    init_server(home, name="server", listen=("127.0.0.1", 0))
    bundles = root / "bundles"
    bundles.mkdir()
    relays = [f"relay{r:02d}" for r in range(RELAYS)]
    clients = [client_name(i) for i in range(nodes)]
    began = time.perf_counter()
    for name in relays:
        enroll(home, name, Role.RELAY, bundles / f"{name}.bundle")
    for name in clients[:real]:
        enroll(home, name, Role.CLIENT, bundles / f"{name}.bundle")
    per_enroll = (time.perf_counter() - began) / (RELAYS + min(real, nodes))
    progress(
        f"enrolled {RELAYS + min(real, nodes)} nodes with enroll: {per_enroll * 1e3:.1f} ms each"
    )
    admin = Admin(home)
    ca_cert, ca_key = admin.paths.ca_cert.read_bytes(), admin.paths.ca_key.read_bytes()
    now = time.time()
    rows = []
    for name in clients[real:]:
        cert, _key, serial = issue_certificate(ca_cert, ca_key, name, Role.CLIENT)
        rows.append((name, Role.CLIENT.value, now, str(serial), public_key_der(cert)))
    with write(admin) as db:
        db.executemany(
            "INSERT INTO nodes(name, role, enrolled, serial, pubkey) VALUES(?,?,?,?,?)", rows
        )
    progress(f"issued and recorded {len(rows)} more client certificates")

    src = root / "pkgsrc"
    src.mkdir()
    (src / "app.bin").write_bytes(random.randbytes(64 * 1024))
    (src / "install.sh").write_text("#!/bin/sh\ncp app.bin /opt/app/\n")
    pid = admin.add_package(src, "app", "2.1", "sh install.sh")
    admin.add_group("all", clients)
    old = [
        admin.create_job(JobType.INSTALL, pid, random.sample(clients, min(OLD_JOB_SIZE, nodes)))
        for _ in range(OLD_JOBS)
    ]
    job = admin.create_job(JobType.INSTALL, pid, ["group:all"])
    fleet(admin, relays, clients, pid, job, old, now)
    admin.close()
    return home, job, clients


@contextlib.contextmanager
def write(admin: Admin) -> Iterator[sqlite3.Connection]:
    """One transaction on the admin's own connection."""
    db = admin.db._db
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def fleet(
    admin: Admin,
    relays: list[str],
    clients: list[str],
    pid: str,
    job: str,
    old: list[str],
    now: float,
) -> None:
    """What a running fleet leaves in the server's database, in one transaction."""
    rng = random.Random(7)
    with write(admin) as db:
        db.executemany(
            "UPDATE nodes SET via=name, parent='server', last_seen=? WHERE name=?",
            [(now - 5, r) for r in relays],
        )
        db.executemany(
            "UPDATE nodes SET via=?, parent=?, last_seen=? WHERE name=?",
            [
                (relays[i % RELAYS], relays[i % RELAYS], now - rng.uniform(0, 3600), c)
                for i, c in enumerate(clients)
            ],
        )
        db.executemany(
            "INSERT OR REPLACE INTO presence VALUES(?,?,?,?,?,?,?)",
            [(r, "server", "rdsd 0.1.0", r, 1, now - 86400, now - 5) for r in relays]
            + [
                (
                    c,
                    relays[i % RELAYS],
                    "rdsd 0.1.0",
                    relays[i % RELAYS],
                    int(rng.random() < 0.9),
                    now - rng.uniform(3600, 86400),
                    now - rng.uniform(0, 600),
                )
                for i, c in enumerate(clients)
            ],
        )
        db.executemany(
            "INSERT OR REPLACE INTO holdings VALUES(?,?,?)",
            [(r, pid, now + 90 * 86400) for r in relays],
        )
        for jid in old:
            db.execute(
                "UPDATE dests SET state=?, detail='install command exited 0', updated=? "
                "WHERE job=?",
                (DestState.INSTALLED, now - 7 * 86400, jid),
            )
        shuffled = clients[:]
        rng.shuffle(shuffled)
        start = 0
        for n, (state, share) in enumerate(MIX):
            end = len(shuffled) if n == len(MIX) - 1 else start + round(share * len(shuffled))
            mine = shuffled[start:end]
            start = end
            set_state(db, job, pid, state, mine, now, rng)


def set_state(
    db: sqlite3.Connection,
    job: str,
    pid: str,
    state: DestState,
    nodes: list[str],
    now: float,
    rng: random.Random,
) -> None:
    details: dict[DestState, Callable[[], str]] = {
        DestState.INSTALLED: lambda: "install command exited 0",
        DestState.WAITING: lambda: "",
        DestState.INSTALLING: lambda: "running sh install.sh",
        DestState.FAILED: lambda: (
            "not installed: install command exited 1: cp: cannot create "
            "regular file '/opt/app/': No such file or directory"
        ),
        DestState.CANCELLED: lambda: "cancelled by the operator",
    }
    rows = []
    for node in nodes:
        updated = now - rng.uniform(0, 1800)
        if state is DestState.TRANSFERRING:
            done = rng.randrange(PACKAGE_SIZE)
            before = max(0, done - rng.randrange(4 * 1024 * 1024))
            detail = progress_detail(done, PACKAGE_SIZE)
            db.execute(
                "INSERT INTO progress VALUES(?,?,?,?,?,?,?)",
                (job, node, done, PACKAGE_SIZE, updated, before, updated - 1.0),
            )
        else:
            detail = details[state]()
        rows.append(
            (state, detail, updated, "server" if state is DestState.CANCELLED else node, job, node)
        )
        if state is DestState.INSTALLED:
            db.execute(
                "INSERT OR REPLACE INTO installed VALUES(?,?,?,?)", (node, pid, job, updated)
            )
    db.executemany(
        "UPDATE dests SET state=?, detail=?, updated=?, origin=?, seq=1 WHERE job=? AND node=?",
        rows,
    )


# -- timing -------------------------------------------------------------------------------


def timed(
    argv: list[str],
    repeat: int,
    check: Callable[[str], None],
    trees: list[dict[str, str]],
    cwd: Path,
) -> list[list[float]]:
    """Wall times of ``repeat`` runs of ``argv`` for each source tree (an
    environment that selects it), the trees taking turns so a change in the
    machine's load falls on all of them alike, after one untimed warm-up
    each; every run must exit 0 and its stdout pass ``check``. ``cwd`` is
    outside both trees: ``python -c`` looks for modules there first."""
    times: list[list[float]] = [[] for _ in trees]
    for n in range(repeat + 1):
        for tree, env in enumerate(trees):
            t0 = time.perf_counter()
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=120, env=env, cwd=cwd
            )
            took = time.perf_counter() - t0
            if proc.returncode != 0:
                raise RuntimeError(
                    f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}"
                )
            check(proc.stdout)
            if n:
                times[tree].append(took)
    return times


def anything(out: str) -> None:
    return None


def json_list(length: int, key: str | None = None) -> Callable[[str], None]:
    def check(out: str) -> None:
        doc = json.loads(out)
        items = doc[key] if key else doc
        if len(items) != length:
            raise RuntimeError(f"expected {length} items, got {len(items)}")

    return check


def lines_at_least(count: int) -> Callable[[str], None]:
    def check(out: str) -> None:
        if out.count("\n") < count:
            raise RuntimeError(f"expected at least {count} lines, got {out.count(chr(10))}")

    return check


@contextlib.contextmanager
def server_daemon(home: Path) -> Iterator[tuple[str, int]]:
    """``rdsd run`` on the server home; yields where it listens."""
    proc = subprocess.Popen(
        [*script("rdsd"), "run", "--home", str(home), "--log-format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        addr = None
        while addr is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the server daemon exited with {proc.wait()}")
            m = re.search(r"listening on ([0-9.]+):([0-9]+)", line)
            if m:
                addr = (m.group(1), int(m.group(2)))
        if addr is None:
            raise RuntimeError("the server daemon did not listen within 60 s")
        yield addr
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=10_000, help="clients (default 10,000)")
    ap.add_argument("--real", type=int, default=40, help="clients enrolled with enroll itself")
    ap.add_argument("--repeat", type=int, default=7, help="timed runs per command (median)")
    ap.add_argument(
        "--before",
        metavar="REV",
        help="also time the code of git revision REV (exported to a temporary directory and "
        "put first on PYTHONPATH), taking turns with this tree's, on the same home",
    )
    ap.add_argument("--dir", type=Path, help="work here and keep everything")
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="rdsd-cli-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        return run(args, root)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


def export(rev: str, into: Path) -> Path:
    """The source tree of ``rev`` (git archive), for PYTHONPATH."""
    into.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "rdsd", "protocol"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run(args: argparse.Namespace, root: Path) -> int:
    began = time.perf_counter()
    home, job, clients = build(root, args.nodes, args.real)
    progress(f"server home with {args.nodes} clients in {time.perf_counter() - began:.1f} s")
    # As installed: modules compiled once and their bytecode cached (in a
    # directory of the run's own, so neither source tree is written to).
    here = {k: v for k, v in os.environ.items() if k not in DROPPED}
    compiled = {**here, "PYTHONPYCACHEPREFIX": str(root / "pycache")}
    # As this machine's environment runs Python: no bytecode written, so
    # every run compiles rdsd's sources again (the standard library keeps
    # its installed bytecode).
    sources = {**here, "PYTHONDONTWRITEBYTECODE": "1"}
    trees, plain, names = [compiled], [sources], ["this tree"]
    if args.before:
        old = str(export(args.before, root / "before"))
        trees.insert(0, {**compiled, "PYTHONPATH": old})
        plain.insert(0, {**sources, "PYTHONPATH": old})
        names.insert(0, f"{args.before} (before)")
    rdsd, h = script("rdsd"), ["--home", str(home)]
    n = args.nodes
    rows: list[tuple[str, list[list[float]]]] = []

    def measure(
        label: str, argv: list[str], check: Callable[[str], None], bytecode: bool = True
    ) -> None:
        progress(label)
        rows.append((label, timed(argv, args.repeat, check, trees if bytecode else plain, root)))

    py = sys.executable
    measure("python -c pass", [py, "-c", "pass"], anything)
    measure("python -c 'import rdsd.cli.rdsd'", [py, "-c", "import rdsd.cli.rdsd"], anything)
    measure(
        "  the same, sources compiled every run",
        [py, "-c", "import rdsd.cli.rdsd"],
        anything,
        bytecode=False,
    )
    measure("rdsd --version", [*rdsd, "--version"], anything)
    status = [*rdsd, "job", "status", job, *h]
    measure(
        f"rdsd job status JOB --json ({n} dests)", [*status, "--json"], json_list(n, "destinations")
    )
    measure(
        "  the same, sources compiled every run",
        [*status, "--json"],
        json_list(n, "destinations"),
        bytecode=False,
    )
    measure(f"rdsd job status JOB ({n} dests)", status, lines_at_least(n))
    measure(
        f"rdsd nodes --json ({n + RELAYS} nodes)",
        [*rdsd, "nodes", *h, "--json"],
        json_list(n + RELAYS),
    )
    measure(f"rdsd nodes ({n + RELAYS} nodes)", [*rdsd, "nodes", *h], lines_at_least(n))
    measure(
        f"rdsd job list ({OLD_JOBS + 1} jobs)",
        [*rdsd, "job", "list", *h],
        lines_at_least(OLD_JOBS + 1),
    )
    measure(
        f"rdsd job list --json ({OLD_JOBS + 1} jobs)",
        [*rdsd, "job", "list", *h, "--json"],
        json_list(OLD_JOBS + 1),
    )

    # rdsft -a needs a parent to ask: the server daemon, and a client home
    # made from a real bundle (a client whose destination is final: nothing pending).
    quiet = next(c for c in clients[: args.real] if is_final(home, job, c))
    with server_daemon(home) as addr:
        client = root / quiet
        init_node(client, Role.CLIENT, root / "bundles" / f"{quiet}.bundle", addr)
        measure(
            "rdsft -a (nothing pending)",
            [*script("rdsft"), "-a", "--home", str(client)],
            lambda out: None if "no pending jobs" in out else fail(out),
        )

    print()
    print(
        f"wall seconds, median / min of {args.repeat} runs each after one warm-up, "
        f"the trees taking turns; Python {sys.version.split()[0]}, {os.cpu_count()} cores"
    )
    head = "".join(f" {name[:22]:>22}" for name in names)
    ratio = "  after/before" if len(names) == 2 else ""
    print(f"{'command':<46}{head}{ratio}")
    for label, times in rows:
        cells = "".join(f" {statistics.median(t):>10.3f} / {min(t):<9.3f}" for t in times)
        if len(times) == 2:
            cells += f" {statistics.median(times[1]) / statistics.median(times[0]):>12.2f}"
        print(f"{label:<46}{cells}")
    return 0


def is_final(home: Path, job: str, node: str) -> bool:
    with contextlib.closing(sqlite3.connect(HomePaths(home).db)) as db:
        row = db.execute("SELECT state FROM dests WHERE job=? AND node=?", (job, node)).fetchone()
    return row is not None and DestState(row[0]).final


def fail(out: str) -> None:
    raise RuntimeError(f"unexpected output: {out.strip()[:200]}")


if __name__ == "__main__":
    sys.exit(main())
