"""``rdsd``: set up homes, run the daemon, and administer packages and jobs.

This module only parses arguments, calls the admin API (or the daemon in
``daemon.py``) and prints through ``output.py``. Every value is read with
``rdsd.util.parse`` before anything changes; errors go to stderr as one
line with the exit statuses ``output.py`` lists (2 for usage, 1 for a
refused operation); ``--json`` prints exactly one JSON document.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .. import __version__
from ..admin import Admin, enroll, init_node, init_server
from ..config import DEFAULT_KEEP, default_home
from ..domain import JobType, Role
from ..errors import ConfigError
from ..util.parse import check_node_name, parse_address, parse_duration, parse_time
from .daemon import cmd_run
from .output import Parser, listing, print_json, run_cli, table

HOME_HELP = (
    "the node's home directory (default: $RDSD_HOME, else /var/lib/rdsd for root "
    "and ~/.local/share/rdsd for anyone else)"
)


def _home(args: argparse.Namespace) -> Path:
    return (Path(args.home) if args.home else default_home()).resolve()


# -- commands ------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    home = _home(args)
    if args.role == Role.SERVER:
        for option in ("bundle", "parent"):
            if getattr(args, option):
                raise ConfigError(f"--{option} is for relays and clients, not rdsd init server")
        listen = parse_address(args.listen, what="--listen") if args.listen else ("0.0.0.0", 7700)
        name = check_node_name(args.name, what="--name") if args.name else "server"
        cfg = init_server(home, name=name, listen=listen)
    else:
        if args.name:
            raise ConfigError(f"--name is for servers; a {args.role}'s name comes from its bundle")
        if not args.bundle or not args.parent:
            raise ConfigError(f"rdsd init {args.role} needs --bundle and --parent")
        if args.role == Role.RELAY and not args.listen:
            raise ConfigError("rdsd init relay needs --listen HOST:PORT")
        if args.role == Role.CLIENT and args.listen:
            raise ConfigError("a client does not listen: --listen is for servers and relays")
        parent = parse_address(args.parent, what="--parent")
        node_listen = parse_address(args.listen, what="--listen") if args.listen else None
        cfg = init_node(home, Role(args.role), Path(args.bundle), parent, node_listen)
    print(f"initialised {cfg.role} {cfg.name} in {home}")
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    enroll(_home(args), args.name, args.role, Path(args.out), force=args.force)
    print(f"wrote enrolment bundle for {args.role} {args.name} to {args.out}")
    return 0


def cmd_package(args: argparse.Namespace) -> int:
    # Values first: a malformed one is refused before the home is opened.
    keep = parse_duration(args.keep, what="--keep") if getattr(args, "keep", None) else None
    duration = (
        parse_duration(args.duration, what="DURATION") if args.pcmd == "keep" else DEFAULT_KEEP
    )
    with Admin(_home(args)) as admin:
        if args.pcmd == "add":
            pid = admin.add_package(
                Path(args.src),
                args.name,
                args.version,
                args.install,
                DEFAULT_KEEP if keep is None else keep,
            )
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
        elif args.pcmd == "remove":
            admin.remove_package(args.id)
            print(f"removed {args.id}")
        else:
            info = admin.keep_package(args.id, duration)
            print(f"{info.id} now expires {info.expires}")
    return 0


def cmd_job(args: argparse.Namespace) -> int:
    with Admin(_home(args)) as admin:
        if args.jcmd == "create":
            at = (
                parse_time(args.at, now=time.time(), what="--at", past_hint="omit --at to run now")
                if args.at
                else None
            )
            to = [d.strip() for d in args.to.split(",") if d.strip()]
            print(admin.create_job(args.type, args.package, to, at, request_id=args.request_id))
            return 0
        if args.jcmd == "prune":
            pruned = admin.prune_jobs(parse_duration(args.older_than, what="--older-than"))
            print(f"pruned {len(pruned)} finished job{'' if len(pruned) == 1 else 's'}")
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
        if args.gcmd == "add":
            admin.add_group(args.name, args.nodes)
            print(f"group {args.name}: {' '.join(admin.groups()[args.name])}")
        elif args.gcmd == "remove":
            gone = admin.remove_group(args.name, args.nodes or None)
            left = admin.groups().get(args.name)
            if left:
                print(f"group {args.name}: removed {' '.join(gone)}; left {' '.join(left)}")
            else:
                print(f"removed group {args.name}")
        else:
            groups = admin.groups()
            listing(
                args.json,
                sorted(groups.items()),
                ["GROUP", "NODES"],
                lambda g: [g[0], ",".join(g[1])],
                doc=[{"name": n, "nodes": m} for n, m in sorted(groups.items())],
            )
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
    p = Parser(prog="rdsd", description="rdsd software distribution")
    p.add_argument("--version", action="version", version=f"rdsd {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def home(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--home", help=HOME_HELP)

    def js(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--json", action="store_true", help="print one JSON document")

    init = sub.add_parser("init", help="set up a home directory")
    init.add_argument("role", choices=list(Role), help="what this node is")
    home(init)
    init.add_argument("--name", help="server name (relays and clients take it from the bundle)")
    init.add_argument(
        "--listen",
        help="HOST:PORT to accept children on (servers and relays; default 0.0.0.0:7700)",
    )
    init.add_argument("--bundle", help="enrolment bundle from rdsd enroll (relays and clients)")
    init.add_argument("--parent", help="HOST:PORT of the parent (relays and clients)")
    init.set_defaults(fn=cmd_init)

    en = sub.add_parser("enroll", help="issue a bundle for a relay or client")
    en.add_argument("name", help="the node's name: 1 to 64 of A-Z a-z 0-9 . _ -")
    en.add_argument(
        "--role", required=True, choices=[Role.RELAY, Role.CLIENT], help="what the node is"
    )
    home(en)
    en.add_argument("--out", required=True, help="the bundle file to write (mode 0600)")
    en.add_argument(
        "--force",
        action="store_true",
        help="overwrite --out, and re-enrol a name under another role",
    )
    en.set_defaults(fn=cmd_enroll)

    run = sub.add_parser("run", help="run the daemon in the role of its home")
    home(run)
    run.add_argument(
        "--log-format",
        choices=["console", "json"],
        help="log for people (console) or collectors (json); default from rdsd.toml [log]",
    )
    run.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="least important messages logged; default from rdsd.toml [log]",
    )
    run.set_defaults(fn=cmd_run)

    pkg = sub.add_parser("package", help="the server's package storehouse")
    psub = pkg.add_subparsers(dest="pcmd", required=True, metavar="ACTION")
    add = psub.add_parser("add", help="pack a directory into a signed package")
    add.add_argument("src", help="the directory to pack")
    add.add_argument(
        "--name", required=True, help="package name: A-Z a-z 0-9 . _ - (no '-' at either end)"
    )
    add.add_argument("--version", required=True, help="package version: A-Z a-z 0-9 . _ (no '-')")
    add.add_argument("--install", help="install command, run in the extracted package")
    add.add_argument(
        "--keep", help="how long relays keep it: 90s, 15m, 12h, 30d, up to 10 years (default 90d)"
    )
    home(add)
    ls = psub.add_parser("list", help="packages in the store")
    home(ls)
    js(ls)
    keep = psub.add_parser("keep", help="change a package's keep duration")
    keep.add_argument("id", help="package id, NAME-VERSION")
    keep.add_argument("duration", help="new keep duration: 90s, 15m, 12h, 30d, up to 10 years")
    home(keep)
    rm = psub.add_parser("remove", help="delete a package no unfinished job uses")
    rm.add_argument("id", help="package id, NAME-VERSION")
    home(rm)
    pkg.set_defaults(fn=cmd_package)

    job = sub.add_parser("job", help="distribution jobs")
    jsub = job.add_subparsers(dest="jcmd", required=True, metavar="ACTION")
    cr = jsub.add_parser("create", help="make a job; prints its id")
    cr.add_argument("--type", required=True, choices=list(JobType), help="what the job does")
    cr.add_argument("--package", required=True, help="package id, NAME-VERSION")
    cr.add_argument("--to", required=True, help="DEST[,DEST...]: node names or group:NAME")
    cr.add_argument(
        "--at",
        help="ISO 8601 execution time, UTC unless a zone is given; nothing is sent before it; "
        "a time in the past is refused (omit --at to run now)",
    )
    cr.add_argument(
        "--request-id",
        help="idempotency key: the same id again makes no second job and prints the first's id",
    )
    home(cr)
    st = jsub.add_parser("status", help="each destination's state and detail")
    st.add_argument("job", help="job id")
    home(st)
    js(st)
    for name, text in (
        ("retry", "run the failed destinations again"),
        ("cancel", "stop what has not finished"),
    ):
        sp = jsub.add_parser(name, help=text)
        sp.add_argument("job", help="job id")
        home(sp)
    jl = jsub.add_parser("list", help="all jobs with their state counts")
    home(jl)
    js(jl)
    pr = jsub.add_parser("prune", help="delete jobs that finished long enough ago")
    pr.add_argument(
        "--older-than",
        required=True,
        help="delete finished jobs whose last change is older than this: 12h, 30d, ...",
    )
    home(pr)
    job.set_defaults(fn=cmd_job)

    grp = sub.add_parser("group", help="named sets of nodes")
    gsub = grp.add_subparsers(dest="gcmd", required=True, metavar="ACTION")
    ga = gsub.add_parser("add", help="define a group or add nodes to it")
    ga.add_argument("name", help="group name, used as --to group:NAME")
    ga.add_argument("nodes", nargs="+", help="enrolled nodes to add")
    home(ga)
    gl = gsub.add_parser("list", help="groups and their members")
    home(gl)
    js(gl)
    gr = gsub.add_parser("remove", help="remove nodes from a group, or the whole group")
    gr.add_argument("name", help="group name")
    gr.add_argument("nodes", nargs="*", help="members to remove (default: the whole group)")
    home(gr)
    grp.set_defaults(fn=cmd_group)

    nodes = sub.add_parser("nodes", help="known nodes, routes and inventory")
    home(nodes)
    js(nodes)
    nodes.set_defaults(fn=cmd_nodes)

    node = sub.add_parser("node", help="node administration")
    nsub = node.add_subparsers(dest="ncmd", required=True, metavar="ACTION")
    rv = nsub.add_parser("revoke", help="refuse a node from now on")
    rv.add_argument("name", help="node name")
    home(rv)
    node.set_defaults(fn=cmd_node)

    cache = sub.add_parser("cache", help="a relay's package cache")
    csub = cache.add_subparsers(dest="ccmd", required=True, metavar="ACTION")
    cl = csub.add_parser("list", help="what this relay holds, with size and expiry")
    home(cl)
    js(cl)
    cache.set_defaults(fn=cmd_cache)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    return run_cli(parser.prog, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
