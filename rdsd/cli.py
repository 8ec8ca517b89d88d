"""``rdsd``: set up homes, run the daemon, and administer packages and jobs.

The CLI only parses arguments, calls the admin API or builds a NodeConfig
and runs a Node, and prints. Errors go to stderr with exit status 1 (2 for
usage errors, from argparse); ``--json`` prints exactly one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ctypes.util
import fcntl
import json
import os
import resource
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .admin import Admin, AdminError, enroll, init_node, init_server, parse_time
from .config import ConfigError, NodeConfig, Role, parse_address, parse_duration
from .logs import configure
from .manifest import ManifestError
from .packing import PackingError
from .security import SecurityError
from .store import StoreError

T = TypeVar("T")
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
USER_ERRORS = (
    AdminError,
    ConfigError,
    SecurityError,
    StoreError,
    PackingError,
    ManifestError,
    OSError,
)


def _print_json(doc: Any) -> None:
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _listing(
    as_json: bool,
    items: Sequence[T],
    header: list[str],
    row: Callable[[T], list[str]],
    doc: Any = None,
) -> None:
    """What every list command does: one JSON document, or an aligned table."""
    if as_json:
        _print_json(items if doc is None else doc)
    else:
        _table([row(item) for item in items], header)


def _home(args: argparse.Namespace) -> Path:
    return Path(args.home).resolve()


# -- commands ------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    home = _home(args)
    if args.role == "server":
        listen = parse_address(args.listen) if args.listen else ("0.0.0.0", 7700)
        cfg = init_server(home, name=args.name or "server", listen=listen)
    else:
        if not args.bundle or not args.parent:
            raise AdminError(f"rdsd init {args.role} needs --bundle and --parent")
        if args.role == "relay" and not args.listen:
            raise AdminError("rdsd init relay needs --listen HOST:PORT")
        cfg = init_node(
            home,
            Role(args.role),
            Path(args.bundle),
            parse_address(args.parent),
            parse_address(args.listen) if args.listen else None,
        )
    print(f"initialised {cfg.role.value} {cfg.name} in {home}")
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    enroll(_home(args), args.name, args.role, Path(args.out))
    print(f"wrote enrolment bundle for {args.role} {args.name} to {args.out}")
    return 0


def _raise_fd_limit() -> None:
    """A relay holds one socket per child: allow as many as the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _pin_mmap_threshold() -> None:
    """Keep large buffers (each TLS connection's 256 KiB read buffer under
    uvloop) in their own lazily-touched mappings. glibc otherwise raises the
    threshold after the first free, and those buffers then land on reused,
    already-touched heap: measured 117 KiB per idle child session against
    44 KiB with the threshold pinned. Best effort; glibc only."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = NodeConfig.load(_home(args), log_format=args.log_format)
    configure(args.log_format, args.log_level)
    _raise_fd_limit()
    _pin_mmap_threshold()
    pidfile = cfg.paths.pidfile
    fd = os.open(pidfile, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise AdminError(f"a daemon is already running on {cfg.home}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        _run_loop(_serve(cfg))
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)
    return 0


async def _serve(cfg: NodeConfig) -> None:
    from .node import Node

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Node(cfg) as node:
        if node.downlinks is not None:
            host, port = node.address
            print(f"rdsd {cfg.role.value} {cfg.name} listening on {host}:{port}", flush=True)
        else:
            print(f"rdsd client {cfg.name} running", flush=True)
        await stop.wait()


def _run_loop(coro: Any) -> None:
    """The daemon prefers uvloop where it is installed; embedders choose."""
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


def cmd_package(args: argparse.Namespace) -> int:
    with Admin(_home(args)) as admin:
        if args.pcmd == "add":
            keep = parse_duration(args.keep) if args.keep else 90 * 86400
            pid = admin.add_package(Path(args.src), args.name, args.version, args.install, keep)
            print(pid)
        elif args.pcmd == "list":
            pkgs = admin.packages()
            _listing(
                args.json,
                pkgs,
                ["PACKAGE", "SIZE", "ADDED", "EXPIRES", "INSTALL"],
                lambda p: [p.id, str(p.size), p.added or "", p.expires or "", " ".join(p.install)],
                doc=[p.to_json() for p in pkgs],
            )
        else:
            info = admin.keep_package(args.id, parse_duration(args.duration))
            print(f"{info.id} now expires {info.expires}")
    return 0


def cmd_job(args: argparse.Namespace) -> int:
    with Admin(_home(args)) as admin:
        if args.jcmd == "create":
            at = parse_time(args.at) if args.at else None
            to = [d.strip() for d in args.to.split(",") if d.strip()]
            print(admin.create_job(args.type, args.package, to, at))
            return 0
        if args.jcmd == "retry":
            nodes = admin.retry(args.job)
            print(f"retrying {args.job} on {', '.join(nodes)}")
            return 0
        if args.jcmd == "cancel":
            nodes = admin.cancel(args.job)
            print(f"cancelled {args.job} on {', '.join(nodes) or 'no unfinished destination'}")
            return 0
        if args.jcmd == "list":
            _listing(
                args.json,
                admin.jobs(),
                ["JOB", "TYPE", "PACKAGE", "AT", "STATES"],
                lambda j: [
                    j["id"],
                    j["type"],
                    j["package"],
                    j["at"] or "-",
                    ", ".join(f"{k}={v}" for k, v in sorted(j["states"].items())),
                ],
            )
            return 0
        status = admin.job_status(args.job)
        if args.json:
            _print_json(status)
        else:
            when = f" at {status['at']}" if status["at"] else ""
            print(f"job {status['id']}: {status['type']} {status['package']}{when}")
            _table(
                [[d["node"], d["state"], d["detail"]] for d in status["destinations"]],
                ["NODE", "STATE", "DETAIL"],
            )
        return 0


def cmd_group(args: argparse.Namespace) -> int:
    with Admin(_home(args)) as admin:
        admin.add_group(args.name, args.nodes)
    print(f"group {args.name}: {' '.join(args.nodes)}")
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    with Admin(_home(args)) as admin:
        nodes = admin.nodes()
    _listing(
        args.json,
        nodes,
        ["NODE", "ROLE", "VIA", "LAST SEEN", "", "INSTALLED", "HOLDS"],
        lambda n: [
            n["name"],
            n["role"],
            n["via"] or "-",
            n["last_seen"] or "never",
            "revoked" if n["revoked"] else "",
            ",".join(n["installed"]),
            ",".join(h["package"] for h in n["holds"]),
        ],
    )
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    with Admin(_home(args)) as admin:
        admin.revoke(args.name)
    print(f"revoked {args.name}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    with Admin(_home(args)) as admin:
        items = admin.cache()
    _listing(
        args.json,
        items,
        ["PACKAGE", "SIZE", "EXPIRES"],
        lambda i: [i["package"], str(i["size"]), i["expires"]],
    )
    return 0


# -- the parser ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rdsd", description="rdsd software distribution")
    sub = p.add_subparsers(dest="cmd", required=True)

    def home(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--home", required=True, help="the node's home directory")

    def js(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--json", action="store_true", help="print one JSON document")

    init = sub.add_parser("init", help="set up a home directory")
    init.add_argument("role", choices=["server", "relay", "client"])
    home(init)
    init.add_argument("--name", help="server name (relays and clients take it from the bundle)")
    init.add_argument("--listen", help="HOST:PORT to accept children on")
    init.add_argument("--bundle", help="enrolment bundle from rdsd enroll")
    init.add_argument("--parent", help="HOST:PORT of the parent")
    init.set_defaults(fn=cmd_init)

    en = sub.add_parser("enroll", help="issue a bundle for a relay or client")
    en.add_argument("name")
    en.add_argument("--role", required=True, choices=["relay", "client"])
    home(en)
    en.add_argument("--out", required=True)
    en.set_defaults(fn=cmd_enroll)

    run = sub.add_parser("run", help="run the daemon in the role of its home")
    home(run)
    run.add_argument("--log-format", choices=["console", "json"], default="console")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    run.set_defaults(fn=cmd_run)

    pkg = sub.add_parser("package", help="the server's package storehouse")
    psub = pkg.add_subparsers(dest="pcmd", required=True)
    add = psub.add_parser("add", help="pack a directory into a signed package")
    add.add_argument("src")
    add.add_argument("--name", required=True)
    add.add_argument("--version", required=True)
    add.add_argument("--install", help="install command, run in the extracted package")
    add.add_argument("--keep", help="how long relays keep it: 90s, 15m, 12h, 30d (default 90d)")
    home(add)
    ls = psub.add_parser("list")
    home(ls)
    js(ls)
    keep = psub.add_parser("keep", help="change a package's keep duration")
    keep.add_argument("id")
    keep.add_argument("duration")
    home(keep)
    pkg.set_defaults(fn=cmd_package)

    job = sub.add_parser("job", help="distribution jobs")
    jsub = job.add_subparsers(dest="jcmd", required=True)
    cr = jsub.add_parser("create")
    cr.add_argument("--type", required=True, choices=["install", "transfer", "offer"])
    cr.add_argument("--package", required=True)
    cr.add_argument("--to", required=True, help="DEST[,DEST...]: node names or group:NAME")
    cr.add_argument("--at", help="ISO 8601 execution time; nothing is sent before it")
    home(cr)
    st = jsub.add_parser("status")
    st.add_argument("job")
    home(st)
    js(st)
    for name, text in (
        ("retry", "run the failed destinations again"),
        ("cancel", "stop what has not finished"),
    ):
        sp = jsub.add_parser(name, help=text)
        sp.add_argument("job")
        home(sp)
    jl = jsub.add_parser("list")
    home(jl)
    js(jl)
    job.set_defaults(fn=cmd_job)

    grp = sub.add_parser("group", help="named sets of nodes")
    gsub = grp.add_subparsers(dest="gcmd", required=True)
    ga = gsub.add_parser("add")
    ga.add_argument("name")
    ga.add_argument("nodes", nargs="+")
    home(ga)
    grp.set_defaults(fn=cmd_group)

    nodes = sub.add_parser("nodes", help="known nodes, routes and inventory")
    home(nodes)
    js(nodes)
    nodes.set_defaults(fn=cmd_nodes)

    node = sub.add_parser("node", help="node administration")
    nsub = node.add_subparsers(dest="ncmd", required=True)
    rv = nsub.add_parser("revoke")
    rv.add_argument("name")
    home(rv)
    node.set_defaults(fn=cmd_node)

    cache = sub.add_parser("cache", help="a relay's package cache")
    csub = cache.add_subparsers(dest="ccmd", required=True)
    cl = csub.add_parser("list")
    home(cl)
    js(cl)
    cache.set_defaults(fn=cmd_cache)
    return p


def run_cli(prog: str, args: argparse.Namespace) -> int:
    """Shared by rdsd and rdsft: dispatch, and turn user errors into one line
    on stderr and exit status 1."""
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
    except USER_ERRORS as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    return run_cli(parser.prog, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
