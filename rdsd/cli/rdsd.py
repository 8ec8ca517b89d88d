"""``rdsd``: set up homes, run the daemon, and administer packages and jobs.

This module only parses arguments, calls the admin API (or the daemon in
``daemon.py``) and prints through ``output.py``. Errors go to stderr with
exit status 1 (2 for usage errors, from argparse); ``--json`` prints
exactly one JSON document.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..admin import Admin, enroll, init_node, init_server, parse_time
from ..config import parse_address, parse_duration
from ..domain import JobType, Role
from ..errors import AdminError
from .daemon import cmd_run
from .output import listing, print_json, run_cli, table


def _home(args: argparse.Namespace) -> Path:
    return Path(args.home).resolve()


# -- commands ------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    home = _home(args)
    if args.role == Role.SERVER:
        listen = parse_address(args.listen) if args.listen else ("0.0.0.0", 7700)
        cfg = init_server(home, name=args.name or "server", listen=listen)
    else:
        if not args.bundle or not args.parent:
            raise AdminError(f"rdsd init {args.role} needs --bundle and --parent")
        if args.role == Role.RELAY and not args.listen:
            raise AdminError("rdsd init relay needs --listen HOST:PORT")
        cfg = init_node(
            home,
            Role(args.role),
            Path(args.bundle),
            parse_address(args.parent),
            parse_address(args.listen) if args.listen else None,
        )
    print(f"initialised {cfg.role} {cfg.name} in {home}")
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    enroll(_home(args), args.name, args.role, Path(args.out))
    print(f"wrote enrolment bundle for {args.role} {args.name} to {args.out}")
    return 0


def cmd_package(args: argparse.Namespace) -> int:
    with Admin(_home(args)) as admin:
        if args.pcmd == "add":
            keep = parse_duration(args.keep) if args.keep else 90 * 86400
            pid = admin.add_package(Path(args.src), args.name, args.version, args.install, keep)
            print(pid)
        elif args.pcmd == "list":
            pkgs = admin.packages()
            listing(
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
            listing(
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
            print_json(status)
        else:
            when = f" at {status['at']}" if status["at"] else ""
            print(f"job {status['id']}: {status['type']} {status['package']}{when}")
            table(
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
    listing(
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
    listing(
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
    init.add_argument("role", choices=list(Role))
    home(init)
    init.add_argument("--name", help="server name (relays and clients take it from the bundle)")
    init.add_argument("--listen", help="HOST:PORT to accept children on")
    init.add_argument("--bundle", help="enrolment bundle from rdsd enroll")
    init.add_argument("--parent", help="HOST:PORT of the parent")
    init.set_defaults(fn=cmd_init)

    en = sub.add_parser("enroll", help="issue a bundle for a relay or client")
    en.add_argument("name")
    en.add_argument("--role", required=True, choices=[Role.RELAY, Role.CLIENT])
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
    cr.add_argument("--type", required=True, choices=list(JobType))
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    return run_cli(parser.prog, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
