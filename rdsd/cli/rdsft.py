"""``rdsft``: what a person at a relay or client runs.

``rdsft -a`` asks the parent for this node's pending jobs over a one-shot
connection and does them now, whether or not the daemon runs; the per-job
lock makes sure the daemon and ``rdsft`` never both do one job. ``offers``
and ``install`` let the user of a client choose offered packages, and
``status`` tells the truth about the daemon, the parent and the work.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from protocol import JobCancel, JobNotice

from ..admin import cache_listing, offers_listing
from ..admin.ops import check_package_ref, daemon_pid, limits_listing, limits_text
from ..child.fetcher import Fetcher
from ..child.gate import TransferGate
from ..child.intake import JobIntake
from ..child.uplink import Uplink
from ..config import NodeConfig, default_home, format_address, iso
from ..domain import Dest, DestState, HelloPurpose, Job, JobPace, Role
from ..errors import AdminError, PeerError, SessionClosed
from ..node.runner import Runner, job_lock
from ..packages.manifest import Envelopes
from ..packages.store import Store
from ..security import Verifier, client_context
from ..state import JobDB
from .completion import add_completion
from .output import Parser, VersionAction, run_cli

TIMEOUT = 30.0


class LocalNode:
    """The parts of a node a one-shot command needs, without its daemon."""

    def __init__(self, home: Path) -> None:
        self.cfg = NodeConfig.load(home)
        if self.cfg.role is Role.SERVER:
            raise AdminError("rdsft runs on a relay or a client, not on the managing server")
        paths = self.cfg.paths
        envelopes = Envelopes(Verifier(paths.signing_pub.read_bytes()))
        self.db = JobDB(paths.db)
        self.store = Store(paths.store, envelopes)
        self.store.prepare()
        paths.work.mkdir(exist_ok=True)
        self.intake = JobIntake(self.cfg.name, self.cfg.role, self.db, envelopes)
        ctx = client_context(paths.ca_cert, paths.cert, paths.key)
        self.link = Uplink(
            self.cfg, ctx, self, purpose=HelloPurpose.QUERY, counter=self.db.next_claim_counter
        )
        # One-shot: work outside its window is left to the daemon, not waited for.
        gate = TransferGate(self.cfg, self._paces, self.db.package_rate, waits=False)
        self.fetcher = Fetcher(self.cfg, self.store, self.link, gate=gate)
        self.runner = Runner(self.cfg, self.db, self.store, envelopes, self.fetcher, lambda: None)
        self._acked = asyncio.Event()

    def close(self) -> None:
        self.db.close()

    def _paces(self, package: str) -> list[JobPace]:
        """Rates and windows of this node's own jobs for ``package``."""
        return [
            self.db.job_pace(job.id)
            for job, _ in self.db.own_work(self.cfg.name, float("inf"), waiting_only=False)
            if job.package == package
        ]

    # UplinkHandler: record what the parent sends, nothing more.
    async def on_connected(self, link: Uplink) -> None:
        return None

    async def on_job_notice(self, notice: JobNotice) -> None:
        self.intake.accept(notice, only_mine=True)

    async def on_job_cancel(self, cancel: JobCancel) -> None:
        return None

    async def on_revoked(self, nodes: list[str]) -> None:
        return None

    def on_report_ack(self, report_id: str) -> None:
        self.db.ack(report_id)
        self._acked.set()

    def my_work(self) -> list[Job]:
        return [job for job, _ in self.db.own_work(self.cfg.name, time.time(), False)]

    async def connected(self) -> asyncio.Task[None]:
        """A session to the parent, served in a task; a refusal or an
        unreachable parent becomes one line a person can act on."""
        assert self.cfg.parent is not None
        where = format_address(self.cfg.parent)
        try:
            session = await self.link.connect_once()
        except PeerError as exc:
            reason = exc.reason
            raise AdminError(f"the parent at {where} refused {self.cfg.name}: {reason}") from None
        except TimeoutError:
            raise AdminError(f"the parent at {where} did not answer in time") from None
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__
            raise AdminError(f"cannot reach the parent at {where}: {reason}") from None
        return asyncio.create_task(self.link.serve(session))

    async def deliver_reports(self, timeout: float) -> bool:
        """Send the outbox and wait for every acknowledgement; each ack wakes
        this to look again (reports sent on this session go once)."""
        async with asyncio.timeout(timeout):
            while self.db.outbox_after(0, 1):
                self._acked.clear()
                while rows := self.db.outbox_after(self.link.reports_upto):
                    if not self.link.send_reports(rows):
                        raise TimeoutError("the parent hung up before acknowledging")
                await self._acked.wait()
        return True

    async def hang_up(self, serving: asyncio.Task[None]) -> None:
        await self.link.close("done")
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError, SessionClosed):
            await serving


async def check_now(local: LocalNode) -> list[tuple[Job, Dest | None]]:
    """Ask for pending jobs, do them, report, and return their outcomes."""
    serving = await local.connected()
    try:
        await local.link.query_pending(TIMEOUT)
        results: list[tuple[Job, Dest | None]] = []
        for job in local.my_work():
            async with asyncio.timeout(local.cfg.install_timeout + 3600):
                # The daemon holds the job's lock: wait for its outcome.
                while (dest := await local.runner.run(job)) is None:  # noqa: ASYNC110
                    await asyncio.sleep(0.2)
            results.append((job, dest))
        with contextlib.suppress(TimeoutError):
            await local.deliver_reports(TIMEOUT)
        return results
    finally:
        await local.hang_up(serving)


def cmd_check(args: argparse.Namespace) -> int:
    local = LocalNode(_home(args))
    try:
        results = asyncio.run(check_now(local))
        left = len(local.db.outbox())
    finally:
        local.close()
    if not results:
        print("no pending jobs")
    failed = False
    for job, dest in results:
        state = dest.state if dest else "unknown"
        detail = f" ({dest.detail})" if dest and dest.detail else ""
        failed |= state == DestState.FAILED
        print(f"{job.id} {job.type} {job.package}: {state}{detail}")
    if left:
        print(f"{left} report(s) not yet acknowledged; they will be sent again", file=sys.stderr)
    return 1 if failed else 0


def _offers(local: LocalNode) -> list[dict[str, Any]]:
    return offers_listing(local.db, local.store, local.cfg.name)


def cmd_offers(args: argparse.Namespace) -> int:
    local = LocalNode(_home(args))
    try:
        offers = _offers(local)
    finally:
        local.close()
    if args.json:
        json.dump(offers, sys.stdout, indent=2)
        print()
    elif not offers:
        print("nothing is offered")
    else:
        for o in offers:
            print(f"{o['id']}  {o['size']} bytes  offered {o['offered']}  expires {o['expires']}")
    return 0


async def _install_offer(local: LocalNode, package: str) -> Dest | None:
    check_package_ref(package)
    offer = next((o for o in _offers(local) if o["id"] == package), None)
    if offer is None:
        raise AdminError(f"{package} is not offered to {local.cfg.name} (see rdsft offers)")
    job = local.db.job(offer["job"])
    m = local.store.manifest(package)
    assert job is not None and m is not None
    with job_lock(local.cfg.paths.locks, job.id) as mine:
        if not mine:
            raise AdminError(f"job {job.id} is busy in another process; try again")
        await local.runner.install(job, m)
    with contextlib.suppress(Exception):
        serving = await local.connected()
        try:
            await local.deliver_reports(10)
        finally:
            await local.hang_up(serving)
    return local.db.dest(job.id, local.cfg.name)


def cmd_install(args: argparse.Namespace) -> int:
    local = LocalNode(_home(args))
    try:
        dest = asyncio.run(_install_offer(local, args.package))
        queued = len(local.db.outbox())
    finally:
        local.close()
    state = dest.state if dest else "unknown"
    print(f"{args.package}: {state}" + (f" ({dest.detail})" if dest and dest.detail else ""))
    if queued:
        print("the parent was not reachable; the report is queued for the daemon", file=sys.stderr)
    return 0 if state == DestState.INSTALLED else 1


def _daemon_pid(cfg: NodeConfig) -> int | None:
    """The running daemon's pid: it holds the pid file's lock while it runs."""
    return daemon_pid(cfg.paths.pidfile)


async def _probe(local: LocalNode) -> tuple[bool, str]:
    try:
        async with asyncio.timeout(5):
            session = await local.link.connect_once()
            await session.goodbye("status probe")
        return True, f"{local.link.parent_name} ({local.link.parent_role})"
    except Exception as exc:
        return False, str(exc) or type(exc).__name__


def cmd_status(args: argparse.Namespace) -> int:
    local = LocalNode(_home(args))
    try:
        cfg = local.cfg
        pid = _daemon_pid(cfg)
        reachable, parent = asyncio.run(_probe(local))
        work = [
            {
                "job": d.job,
                "package": j.package,
                "type": j.type,
                "state": d.state,
                "detail": d.detail,
                "updated": iso(d.updated),
            }
            for j, d in local.db.own_work(cfg.name, float("inf"), waiting_only=False)
        ]
        doc: dict[str, Any] = {
            "node": cfg.name,
            "role": cfg.role,
            "daemon": {"running": pid is not None, "pid": pid},
            "parent": {
                "address": f"{cfg.parent[0]}:{cfg.parent[1]}" if cfg.parent else None,
                "reachable": reachable,
                "detail": parent,
            },
            "installed": local.db.installed().get(cfg.name, []),
            "limits": limits_listing(NodeConfig.load(cfg.home)),
            "work": work,
            "unsent_reports": len(local.db.outbox()),
        }
        if cfg.role is Role.RELAY:
            doc["cache"] = cache_listing(local.store)
    finally:
        local.close()
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        print()
        return 0
    print(f"{doc['role']} {doc['node']}")
    print(f"  daemon:    {'running, pid ' + str(pid) if pid else 'not running'}")
    print(
        f"  parent:    {doc['parent']['address']} "
        f"{'reachable: ' if reachable else 'UNREACHABLE: '}{parent}"
    )
    print(f"  installed: {', '.join(doc['installed']) or 'nothing'}")
    print(f"  limits:    {limits_text(doc['limits'], cfg.role)}")
    print(f"  work:      {len(work)} unfinished")
    for w in work:
        print(f"    {w['job']} {w['type']} {w['package']}: {w['state']} {w['detail']}".rstrip())
    if doc["unsent_reports"]:
        print(f"  reports:   {doc['unsent_reports']} waiting for the parent")
    return 0


HOME_HELP = (
    "the node's home directory (default: $RDSD_HOME, else /var/lib/rdsd for root "
    "and ~/.local/share/rdsd for anyone else)"
)


def _home(args: argparse.Namespace) -> Path:
    return (Path(args.home) if args.home else default_home()).resolve()


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="rdsft", description="check and run jobs for this node")
    p.add_argument("--version", action=VersionAction)
    p.add_argument(
        "-a",
        dest="check",
        action="store_true",
        help="ask the parent for pending jobs for this node and do them now",
    )
    p.add_argument("--home", help=HOME_HELP)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    def home(sp: argparse.ArgumentParser) -> None:
        # SUPPRESS: a --home given before the command is not reset here.
        sp.add_argument("--home", default=argparse.SUPPRESS, help=HOME_HELP)

    of = sub.add_parser("offers", help="packages offered to this client")
    home(of)
    of.add_argument("--json", action="store_true", help="print one JSON document")
    of.set_defaults(fn=cmd_offers)
    ins = sub.add_parser("install", help="install an offered package now")
    ins.add_argument("package", help="package id, NAME-VERSION, as rdsft offers lists it")
    home(ins)
    ins.set_defaults(fn=cmd_install)
    st = sub.add_parser("status", help="daemon, parent, installed packages, work in progress")
    home(st)
    st.add_argument("--json", action="store_true", help="print one JSON document")
    st.set_defaults(fn=cmd_status)
    add_completion(sub, p)
    p.set_defaults(fn=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.fn is None:
        if not args.check:
            parser.error("use rdsft -a [--home DIR], or one of: offers, install, status")
        args.fn = cmd_check
    elif args.check:
        parser.error(f"-a does not go with {args.cmd}")
    return run_cli(parser.prog, args)


if __name__ == "__main__":
    sys.exit(main())
