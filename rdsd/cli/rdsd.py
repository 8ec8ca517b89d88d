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
from typing import Any

from ..admin.ops import Admin, limits_text
from ..admin.watch import Change, wait_job
from ..config import DEFAULT_KEEP, default_home
from ..domain import JobFilter, JobPace, JobType, Role
from ..errors import AdminError, ConfigError
from ..util import parse as parsing
from ..util.parse import check_node_name, parse_address, parse_duration, parse_time
from . import watch
from .completion import add_completion
from .output import Parser, VersionAction, listing, print_json, run_cli, table

HOME_HELP = (
    "the node's home directory (default: $RDSD_HOME, else /var/lib/rdsd for root "
    "and ~/.local/share/rdsd for anyone else)"
)


def _home(args: argparse.Namespace) -> Path:
    return (Path(args.home) if args.home else default_home()).resolve()


# -- commands ------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from ..admin.setup import init_node, init_server

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
    from ..admin.setup import enroll

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
            pace = JobPace(
                parsing.parse_rate(args.rate, what="--rate") if args.rate else 0.0,
                tuple(parsing.parse_window(w, what="--window") for w in args.window or ()),
            )
            print(
                admin.create_job(
                    args.type, args.package, to, at, request_id=args.request_id, pace=pace
                )
            )
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
            since = parsing.parse_duration(args.since, what="--since") if args.since else None
            listing(
                args.json,
                admin.jobs(args.state, since, args.limit),
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
            if status["rate"] or status["windows"]:
                rate = parsing.format_rate(status["rate"]) if status["rate"] else "unlimited"
                windows = ", ".join(status["windows"]) or "any time"
                print(f"paced: {rate} on every hop; windows: {windows} (each node's local time)")
            table(
                [
                    [
                        d["node"],
                        d["state"],
                        _bytes_column(d),
                        watch.human_rate(d["rate"]),
                        watch.human_eta(d["eta"]),
                        watch.human_detail(d["detail"]),
                    ]
                    for d in status["destinations"]
                ],
                ["NODE", "STATE", "BYTES", "RATE", "ETA", "DETAIL"],
            )
        return 0


def _bytes_column(d: dict[str, Any]) -> str:
    if d["bytes_total"] is None:
        return "-"
    return f"{watch.human_bytes(d['bytes_done'])}/{watch.human_bytes(d['bytes_total'])}"


def _timeout(text: str) -> float:
    """``--timeout``: seconds (``90``, ``2.5``) or a duration (``15m``)."""
    try:
        value = float(text)
    except ValueError:
        return parsing.parse_duration(text, minimum=0.001, what="--timeout")
    if not 0 < value < float("inf"):
        raise AdminError(f"--timeout must be a positive number of seconds, not {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def cmd_job_wait(args: argparse.Namespace) -> int:
    """Block until every destination is final: exit 0 if all succeeded, 1 if
    any failed or was cancelled, 3 on timeout."""
    timeout = _timeout(args.timeout) if args.timeout is not None else None
    with Admin(_home(args)) as admin:
        admin.job_status(args.job)  # an unknown job is an error now, not a timeout
        last: dict[str, Any] = {}

        def keep(status: dict[str, Any], moved: list[Change]) -> None:
            last["status"] = status

        if watch.is_terminal():
            with watch.LiveView() as view:

                def draw(status: dict[str, Any], moved: list[Change]) -> None:
                    keep(status, moved)
                    view.update(status, moved)

                outcome = wait_job(admin, args.job, timeout, draw)
        else:

            def lines(status: dict[str, Any], moved: list[Change]) -> None:
                keep(status, moved)
                watch.print_changes(status, moved)

            outcome = wait_job(admin, args.job, timeout, lines)
    print(watch.summary(last["status"], outcome, timeout), flush=True)
    return int(outcome)


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
        limits, me, role = admin.limits(), admin.cfg.name, admin.cfg.role
    listing(
        args.json,
        nodes,
        ["NODE", "ROLE", "ONLINE", "VIA", "VERSION", "LAST SEEN", "", "INSTALLED", "HOLDS"],
        lambda n: [
            n["name"],
            n["role"],
            "yes" if n["online"] else "no",
            n["via"] or "-",
            n["version"] or "-",
            n["last_seen"] or "never",
            "revoked" if n["revoked"] else "",
            ",".join(n["installed"]),
            ",".join(h["package"] for h in n["holds"]),
        ],
    )
    if not args.json:
        print(f"limits of {me}: {limits_text(limits, role)}")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    with Admin(_home(args)) as admin:
        pid, limits = admin.reload()
        me, role = admin.cfg.name, admin.cfg.role
    print(f"told the daemon of {me} (pid {pid}) to take: {limits_text(limits, role)}")
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


def cmd_run(args: argparse.Namespace) -> int:
    """``rdsd run``: the daemon (``daemon.py``), imported only for it, since
    it brings the whole node with it."""
    from .daemon import cmd_run as run

    return run(args)


# -- the parser ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="rdsd", description="rdsd software distribution")
    p.add_argument("--version", action=VersionAction)
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
    cr.add_argument(
        "--rate",
        help="most package data per second on every hop this job crosses, like 20MB/s, "
        "512KiB/s or 100Mbit/s (default: only the nodes' own limits)",
    )
    cr.add_argument(
        "--window",
        action="append",
        metavar="HH:MM-HH:MM",
        help="transfer and install only inside this window, in each node's local time "
        "(22:00-06:00 spans midnight); repeat for several",
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
    jl.add_argument("--state", choices=list(JobFilter), help="running, failed or done jobs only")
    jl.add_argument("--since", metavar="DURATION", help="jobs created within this long: 1h, 7d")
    jl.add_argument("--limit", type=_positive, metavar="N", help="the newest N jobs only")
    home(jl)
    js(jl)
    wt = jsub.add_parser(
        "wait", help="wait until every destination is final (exit 0 ok, 1 failed, 3 timeout)"
    )
    wt.add_argument("job", help="the job id (from rdsd job create or job list)")
    wt.add_argument("--timeout", metavar="SECONDS", help="give up after this long (exit 3)")
    home(wt)
    wt.set_defaults(fn=cmd_job_wait)
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

    rl = sub.add_parser(
        "reload", help="have the running daemon take rdsd.toml's [limits] and [windows] now"
    )
    home(rl)
    rl.set_defaults(fn=cmd_reload)

    cache = sub.add_parser("cache", help="a relay's package cache")
    csub = cache.add_subparsers(dest="ccmd", required=True, metavar="ACTION")
    cl = csub.add_parser("list", help="what this relay holds, with size and expiry")
    home(cl)
    js(cl)
    cache.set_defaults(fn=cmd_cache)
    add_completion(sub, p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    return run_cli(parser.prog, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
