"""The typed admin API behind every ``rdsd`` and ``rdsft`` command.

Admin operations act on a home directory: they write the job database and
the store, and a running daemon on that home notices within its poll
interval (it watches SQLite's ``data_version``), so no restart and no
control socket are needed. Embedders call the same functions the CLI does.

Every operation checks all of its input before it changes anything, with
the parsers of ``rdsd.util.parse``: a malformed or out-of-range value is a
``ConfigError`` (the command line exits 2), a well-formed request that
cannot be done here (an unknown node, a package still in use) an
``AdminError`` (exit 1). Either way nothing was written.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol import is_package_id

from ..config import DEFAULT_KEEP, NodeConfig, iso
from ..domain import (
    TARGET_ROLE,
    DestState,
    Job,
    JobFilter,
    JobHead,
    JobPace,
    JobType,
    Progress,
    Role,
)
from ..errors import AdminError, ConfigError, JobError
from ..state import JobDB
from ..util import parse
from ..util.fsutil import commit_file, removing_on_error, temp_name, try_lock

if TYPE_CHECKING:
    from ..packages.store import Store
    from ..security import Signer

# The package store, manifests and keys (``packages``, ``security``: the
# cryptography package, structlog, asyncio) are imported by the operations
# that use them, not here: listing jobs and nodes reads only the job
# database, and at fleet size the imports were most of what it cost.

#: What a refusal of an unknown destination suggests.
_SEE_NODES = "see rdsd nodes"
#: How many job ids a refusal names before it says "and N more".
_NAMED = 5


def parse_time(text: str) -> float:
    """ISO 8601 to epoch seconds, past or future (for reading times back,
    as ``--json`` prints them); a time without zone is taken as UTC. A new
    job's ``--at`` is read with ``rdsd.util.parse.parse_time``, which also
    refuses the past."""
    return parse.parse_time(text, now=time.time(), allow_past=True)


def check_at(at: float | None, now: float | None = None) -> float | None:
    """A job's execution time in epoch seconds, as ``create_job`` takes it:
    not more than a minute in the past (a past time is a mistake; no time
    means "now"), not more than ten years ahead."""
    if at is None:
        return None
    now = time.time() if now is None else now
    if not isinstance(at, int | float) or isinstance(at, bool) or not math.isfinite(at):
        raise ConfigError(f"execution time {at!r} is not a number of seconds since 1970")
    if at < now - parse.PAST_GRACE:
        raise ConfigError(
            f"execution time {iso(at)} is in the past (now is {iso(now)}); "
            "give no time to run the job now"
        )
    if at > now + parse.MAX_FUTURE:
        raise ConfigError(f"execution time {iso(at)} is more than ten years ahead")
    return float(at)


def _named(items: list[str]) -> str:
    """A list for a one-line message, cut short when long."""
    shown = ", ".join(items[:_NAMED])
    return shown + (f" and {len(items) - _NAMED} more" if len(items) > _NAMED else "")


def check_package_ref(pid: str) -> str:
    """An id naming a package that should exist: ``NAME-VERSION`` as the
    protocol allows it (ids made before names could hold ``-`` included)."""
    if not is_package_id(pid):
        raise ConfigError(
            f"package id {pid!r} is not NAME-VERSION (like my-app-2.0): "
            "1 to 128 of A-Z a-z 0-9 . _ - with a '-' before the version"
        )
    return pid


@dataclass(frozen=True)
class PackageInfo:
    id: str
    name: str
    version: str
    size: int
    sha256: str
    install: list[str]
    keep: int
    added: str | None
    expires: str | None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Admin:
    """Admin operations on one home directory."""

    def __init__(self, home: Path) -> None:
        self.cfg = NodeConfig.load(home)
        self.paths = self.cfg.paths
        self.db = JobDB(self.paths.db)

    @functools.cached_property
    def store(self) -> Store:
        """This home's package store, opened on first use: its envelope
        cache checks signatures with the deployment's signing key."""
        from ..packages.manifest import Envelopes
        from ..packages.store import Store
        from ..security import Verifier

        envelopes = Envelopes(Verifier(self.paths.signing_pub.read_bytes()))
        return Store(self.paths.store, envelopes)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def require_role(self, *roles: Role | str) -> None:
        allowed = [Role(r) for r in roles]
        if self.cfg.role not in allowed:
            raise AdminError(
                f"{' and '.join(allowed_names(allowed))} only; {self.paths.home} is "
                f"a {self.cfg.role.value} home"
            )

    def _signer(self) -> Signer:
        from ..security import Signer

        return Signer(self.paths.signing_key.read_bytes())

    # -- packages ------------------------------------------------------------------

    def add_package(
        self,
        src: Path,
        name: str,
        version: str,
        install: str | None = None,
        keep: float = DEFAULT_KEEP,
    ) -> str:
        """Pack ``src``, sign its manifest and store it as ``NAME-VERSION``.

        Everything is checked before the archive is written: the id
        (``parse.package_id``: a version never holds ``-``, so every id splits
        back at its last ``-`` alone and two packages cannot share one), the
        install command (split as a POSIX shell would) and the keep duration
        (1 s to 10 years). The archive is packed under a temporary name and
        removed if anything fails."""
        from ..packages.manifest import build_manifest, seal
        from ..packages.packing import pack_directory

        self.require_role(Role.SERVER)
        pid = parse.package_id(name, version)
        keep_s = int(parse.check_seconds(keep, what="keep"))
        argv = parse.check_install_command(install) if install is not None else ()
        if not src.is_dir():
            raise AdminError(f"{src} is not a directory")
        self.store.prepare()
        if self.store.has(pid):
            raise AdminError(f"package {pid} already exists; a name and version are immutable")
        target = self.store.data_path(pid)
        tmp = temp_name(target)
        with removing_on_error(tmp):
            pack_directory(src, tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            manifest = build_manifest(tmp, name, version, argv, keep_s, self.cfg.chunk_size)
            commit_file(tmp, target)
        self.store.replace_envelope(pid, seal(manifest, self._signer()))
        return pid

    def packages(self) -> list[PackageInfo]:
        return [
            PackageInfo(
                id=m.id,
                name=m.name,
                version=m.version,
                size=m.size,
                sha256=m.sha256.hex(),
                install=list(m.install),
                keep=m.keep,
                added=iso(m.added),
                expires=iso(m.expires),
            )
            for m in self.store.manifests()
        ]

    def _where(self) -> str:
        return "storehouse" if self.cfg.role is Role.SERVER else "relay's cache"

    def _envelope(self, pid: str) -> bytes:
        """The stored envelope of package ``pid``, or a refusal naming it."""
        envelope = self.store.envelope(check_package_ref(pid))
        if envelope is None:
            listing = "package" if self.cfg.role is Role.SERVER else "cache"
            raise AdminError(
                f"no package {pid!r} in this {self._where()} (see rdsd {listing} list)"
            )
        return envelope

    def keep_package(self, pid: str, keep: float) -> PackageInfo:
        """Re-sign the manifest with a new keep duration. Relays learn it when
        the package is transferred to them again."""
        from ..packages.manifest import seal

        self.require_role(Role.SERVER)
        keep_s = int(parse.check_seconds(keep, what="keep"))
        self._envelope(pid)
        m = self.store.manifest(pid)
        if m is None:  # pragma: no cover - removed between the two reads
            raise AdminError(f"no package {pid}")
        self.store.replace_envelope(pid, seal(m.with_keep(keep_s), self._signer()))
        return next(p for p in self.packages() if p.id == pid)

    def remove_package(self, pid: str) -> None:
        """Delete a package from the server's store. Refused while a job
        that has not finished uses it (those jobs are named): cancel them
        first. Relays that hold it keep their copy until it expires."""
        self.require_role(Role.SERVER)
        self._envelope(pid)
        users = self.db.remove_unused_package(pid, lambda: self.store.delete(pid))
        if users:
            raise AdminError(
                f"package {pid} is used by unfinished job {_named(users)}; "
                "cancel it or let it finish first"
            )

    # -- jobs ------------------------------------------------------------------------

    def create_job(
        self,
        type_: JobType | str,
        package: str,
        to: list[str],
        at: float | None = None,
        request_id: str | None = None,
        pace: JobPace | None = None,
    ) -> str:
        """Make a job and return its id. ``at`` (epoch seconds) holds it
        until then; it may not lie in the past. ``request_id`` makes the
        call idempotent: the same id again returns the same job. ``pace``
        is the job's own rate (every hop) and windows (transfers and
        installs, in each node's local time)."""
        try:
            job_type = JobType(type_)
        except ValueError:
            raise ConfigError(
                f"job type {type_!r} is not allowed: use {', '.join(JobType)}"
            ) from None
        if request_id is not None:
            parse.check_job_id(request_id, what="request id")
        at = check_at(at)
        if not to:
            raise ConfigError("no destination given: name nodes or group:NAME")
        for dest in to:
            if dest.startswith("group:"):
                parse.check_group_name(dest[6:], what=f"destination {dest!r}: group name")
            else:
                parse.check_node_name(dest, what="destination")
        check_package_ref(package)
        if self.cfg.role is Role.CLIENT:
            raise AdminError("jobs are created on the server or on a relay")
        if job_type is JobType.TRANSFER and self.cfg.role is Role.RELAY:
            raise AdminError("a transfer job cannot be created on a relay; create it on the server")
        envelope = self._envelope(package)
        manifest = self.store.manifest(package)
        if manifest is not None and manifest.expires <= time.time():
            raise AdminError(
                f"package {package} expired at {iso(manifest.expires)}; "
                f"extend it with rdsd package keep {package} DURATION"
            )
        groups = self.db.groups()
        missing = [d[6:] for d in to if d.startswith("group:") and d[6:] not in groups]
        if missing:
            raise AdminError(f"no group named {_named(missing)} (see rdsd group list)")
        nodes = self.db.expand(to)
        self._check_destinations(job_type, nodes)

        def package_still_there() -> None:
            if not self.store.has(package):
                raise AdminError(f"package {package} was removed meanwhile")

        try:
            jid = self.db.create_job(
                job_type,
                package,
                nodes,
                envelope,
                at,
                origin=self.cfg.name,
                request_id=request_id,
                require=package_still_there,
                pace=pace,
            )
        except JobError as exc:
            raise AdminError(str(exc)) from None
        self._nudge()
        return jid

    def _nudge(self) -> None:
        """The job database changed: a daemon running on this home acts now
        rather than at its next look (``poll_interval``)."""
        nudge_daemon(self.paths.pidfile)

    def _check_destinations(self, job_type: JobType, nodes: list[str]) -> None:
        """Every destination is a known, unrevoked node of the role the job
        type goes to, and (on a relay) behind this relay."""
        index = self.db.node_index()
        revoked = sorted(n for n in nodes if n in index and index[n][2])
        if revoked:
            raise AdminError(f"revoked node(s) cannot get jobs: {_named(revoked)}")
        if self.cfg.role is Role.RELAY:
            # A relay can reach only nodes that have connected to it (or below).
            foreign = [n for n in nodes if n not in index or not index[n][1]]
            if foreign:
                raise AdminError(f"not behind this relay: {_named(foreign)}")
        else:
            unknown = [n for n in nodes if n not in index]
            if unknown:
                raise AdminError(f"no node named {_named(unknown)}; enroll it first")
        want = TARGET_ROLE[job_type]
        wrong = [n for n in nodes if index[n][0] != want]
        if wrong:
            what = ", ".join(f"{n} is a {index[n][0]}" for n in wrong[:_NAMED])
            article = "an" if job_type.value[0] in "aeiou" else "a"
            raise AdminError(f"{article} {job_type.value} job goes to {want.value}s only; {what}")

    def _job(self, jid: str) -> Job:
        job = self.db.job(parse.check_job_id(jid))
        if job is None:
            raise AdminError(f"no job {jid} (see rdsd job list)")
        return job

    def retry(self, jid: str) -> list[str]:
        """Run the failed destinations of a job again; the others stay."""
        job = self._job(jid)
        if job.origin != self.cfg.name:
            raise AdminError(f"job {jid} was made at {job.origin}; retry it there")
        if not any(d.state is DestState.FAILED for d in self.db.dests(jid)):
            raise AdminError(f"job {jid} has no failed destinations")
        if not self.store.has(job.package):
            raise AdminError(
                f"package {job.package} of job {jid} is no longer in this {self._where()}"
            )
        nodes = self.db.reset_failed(jid)
        if not nodes:
            raise AdminError(f"job {jid} has no failed destinations")
        self._nudge()
        return nodes

    def cancel(self, jid: str) -> list[str]:
        """Stop what has not finished and mark it cancelled; finished
        destinations keep their state."""
        job = self._job(jid)
        if job.origin != self.cfg.name:
            raise AdminError(f"job {jid} was made at {job.origin}; cancel it there")
        nodes = self.db.unfinished(jid)
        for node in nodes:
            self.db.change(
                jid,
                node,
                DestState.CANCELLED,
                "cancelled by the operator",
                self.cfg.name,
                report=self.cfg.role is not Role.SERVER,
                package=job.package,
            )
        self._nudge()
        return nodes

    def _head(self, jid: str) -> JobHead:
        """The job without its envelope, or a refusal naming it."""
        job = self.db.job_head(parse.check_job_id(jid))
        if job is None:
            raise AdminError(f"no job {jid} (see rdsd job list)")
        return job

    def job_status(self, jid: str) -> dict[str, Any]:
        """The job and each destination's state, detail and transfer
        progress. Built for fleet size: the destinations come from two
        queries (``JobDB.dest_listing``), the job without its envelope, and
        each destination is one dictionary."""
        job = self._head(jid)
        pace = self.db.job_pace(job.id)
        destinations = [
            {
                "node": node,
                "state": state,
                "detail": detail,
                "updated": iso(updated),
                **progress_fields(progress),
            }
            for node, state, detail, updated, progress in self.db.dest_listing(job.id)
        ]
        return {
            "id": job.id,
            "type": job.type,
            "package": job.package,
            "created": iso(job.created),
            "at": iso(job.at),
            "origin": job.origin,
            "rate": pace.rate or None,
            "windows": [parse.format_window(w) for w in pace.windows],
            "destinations": destinations,
        }

    def data_version(self) -> int:
        """Changes whenever another process (the daemon) commits: a cheap
        way for ``job wait`` to know when to look again."""
        return self.db.data_version()

    def jobs(
        self,
        state: JobFilter | str | None = None,
        since: float | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Jobs with their state counts; ``state`` selects running, failed or
        done jobs, ``since`` (seconds) those created that recently, ``limit``
        the newest that many. Filtered in SQL."""
        try:
            selected = JobFilter(state) if state is not None else None
        except ValueError:
            raise AdminError(f"--state must be one of {', '.join(JobFilter)}") from None
        if limit is not None and limit < 1:
            raise AdminError("--limit must be at least 1")
        after = time.time() - since if since is not None else None
        out = []
        for job, counts in self.db.job_summaries(selected, after, limit):
            final = sum(n for st, n in counts.items() if DestState(st).final)
            out.append(
                {
                    "id": job.id,
                    "type": job.type,
                    "package": job.package,
                    "created": iso(job.created),
                    "at": iso(job.at),
                    "states": counts,
                    "done": final == sum(counts.values()),
                }
            )
        return out

    def prune_jobs(self, older_than: float) -> list[str]:
        """Delete jobs that finished (every destination final) more than
        ``older_than`` seconds ago; return their ids. Unfinished jobs are
        never touched, nor jobs whose reports have not yet reached the
        parent."""
        older = parse.check_seconds(older_than, what="older than")
        return self.db.prune(time.time() - older, has_parent=self.cfg.parent is not None)

    # -- nodes and groups ----------------------------------------------------------------

    def add_group(self, name: str, members: list[str]) -> None:
        """Define group ``name`` or add ``members`` to it; every member must
        be a known, unrevoked node."""
        parse.check_group_name(name)
        if not members:
            raise ConfigError(f"group {name}: name at least one node to add")
        for m in members:
            parse.check_node_name(m, what="group member")
        index = self.db.node_index()
        unknown = [m for m in members if m not in index]
        if unknown:
            raise AdminError(f"no node named {_named(unknown)}; enroll it first ({_SEE_NODES})")
        revoked = [m for m in members if index[m][2]]
        if revoked:
            raise AdminError(f"revoked node(s) cannot join a group: {_named(revoked)}")
        self.db.add_group(name, members)

    def groups(self) -> dict[str, list[str]]:
        """Every group and its members, by name."""
        return self.db.groups()

    def remove_group(self, name: str, members: list[str] | None = None) -> list[str]:
        """Take ``members`` out of group ``name``, or remove the whole group
        when none are named; return who was removed. Jobs already made
        for the group keep their destinations."""
        parse.check_group_name(name)
        for m in members or []:
            parse.check_node_name(m, what="group member")
        current = self.db.group_members(name)
        if not current:
            raise AdminError(f"no group named {name} (see rdsd group list)")
        if members:
            outside = [m for m in members if m not in current]
            if outside:
                raise AdminError(f"not in group {name}: {_named(outside)}")
        return self.db.remove_group(name, members or None)

    def nodes(self) -> list[dict[str, Any]]:
        """Known nodes. ``online``: connected now, at any depth (the daemon
        keeps this from its sessions and relays' PRESENCE); ``via``: what the
        node is connected to (this node's own name for a direct child);
        ``route``: the child session it is reached through; ``version``: what
        it said in HELLO; ``paced_at``: this node's per-child limit, on its
        direct children (None: unlimited)."""
        held = self.db.holdings()
        installed = self.db.installed()
        now = time.time()
        out = []
        per_child = self.limits()["per_child_rate"]
        for name, role, route, last_seen, revoked, here in self.db.node_listing():
            if here is None:
                online, via, software, since = False, route, None, None
                if route == name:
                    via = self.cfg.name
                seen = last_seen
            else:
                online, via, software, since, at = here
                seen = at if last_seen is None else max(last_seen, at)
            out.append(
                {
                    "name": name,
                    "role": role,
                    "online": online,
                    "via": via,
                    "route": route,
                    "version": software or None,
                    "last_seen": iso(now if online else seen),
                    "connected_since": iso(since) if online else None,
                    "revoked": revoked,
                    # What this node's per_child_rate holds a direct child to.
                    "paced_at": per_child if route == name else None,
                    "installed": installed.get(name, []),
                    "holds": [
                        {"package": p, "expires": iso(e)}
                        for p, e in sorted(held.get(name, {}).items())
                    ],
                }
            )
        return out

    def limits(self) -> dict[str, Any]:
        """This node's limits and windows as its ``rdsd.toml`` says now (the
        daemon takes a change on SIGHUP or ``rdsd reload``)."""
        return limits_listing(NodeConfig.load(self.cfg.home))

    def reload(self) -> tuple[int, dict[str, Any]]:
        """Have the running daemon take this home's limits and windows now:
        check that ``rdsd.toml`` loads (a bad file is refused here, with its
        reason, and the daemon keeps what it has), then send it SIGHUP.
        Returns the daemon's pid and the limits it is told to take."""
        limits = self.limits()
        pid = daemon_pid(self.paths.pidfile)
        if pid is None or pid <= 0:
            raise AdminError(f"no daemon is running on {self.cfg.home} (start it with rdsd run)")
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            raise AdminError(f"the daemon (pid {pid}) has just stopped") from None
        except PermissionError:
            raise AdminError(
                f"not allowed to signal the daemon (pid {pid}): run as its user"
            ) from None
        return pid, limits

    def revoke(self, name: str) -> None:
        parse.check_node_name(name)
        self.require_role(Role.SERVER)
        if not self.db.revoke(name):
            raise AdminError(f"no node named {name} ({_SEE_NODES})")

    def cache(self) -> list[dict[str, Any]]:
        self.require_role(Role.RELAY)
        return cache_listing(self.store)


def daemon_pid(pidfile: Path) -> int | None:
    """The running daemon's pid (-1 if its pid file is unreadable), or None
    when none runs: a daemon holds the pid file's lock while it runs."""
    try:
        fd = os.open(pidfile, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        if try_lock(fd, shared=True):
            return None
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text.isdigit() else -1
    finally:
        os.close(fd)


def nudge_daemon(pidfile: Path) -> None:
    """SIGUSR1 to the daemon of ``pidfile``, if one runs: it looks at its job
    database at once. Best effort: without it the daemon still sees the
    change at its next poll."""
    pid = daemon_pid(pidfile)
    if pid is not None and pid > 0:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGUSR1)


def limits_listing(cfg: NodeConfig) -> dict[str, Any]:
    """A node's bandwidth limits (bytes per second, None: unlimited) and
    windows (``HH:MM-HH:MM``, local time; empty: any time), for listings."""
    return {
        "download_rate": cfg.download_rate or None,
        "upload_rate": cfg.upload_rate or None,
        "per_child_rate": cfg.per_child_rate or None,
        "transfer_windows": [parse.format_window(w) for w in cfg.transfer_windows],
        "install_windows": [parse.format_window(w) for w in cfg.install_windows],
    }


def limits_text(limits: dict[str, Any], role: Role) -> str:
    """One line for people: the limits that mean something for ``role``."""

    def rate(key: str) -> str:
        value = limits[key]
        return parse.format_rate(value) if value else "unlimited"

    def windows(key: str) -> str:
        return ", ".join(limits[key]) or "any time"

    parts = []
    if role is not Role.SERVER:
        parts.append(f"download {rate('download_rate')}")
    if role is not Role.CLIENT:
        parts.append(f"upload {rate('upload_rate')}, per child {rate('per_child_rate')}")
    if role is not Role.SERVER:
        parts.append(f"transfer windows {windows('transfer_windows')}")
    if role is Role.CLIENT:
        parts.append(f"install windows {windows('install_windows')}")
    return "; ".join(parts)


def cache_listing(store: Store) -> list[dict[str, Any]]:
    """What a store holds, as ``rdsd cache list`` and ``rdsft status`` show it."""
    return [{"package": m.id, "size": m.size, "expires": iso(m.expires)} for m in store.manifests()]


def offers_listing(db: JobDB, store: Store, node: str) -> list[dict[str, Any]]:
    """Packages offered to ``node`` and still held, as ``rdsft offers`` shows them."""
    out = []
    for job in db.jobs():
        dest = db.dest(job.id, node)
        if dest is None or dest.state is not DestState.OFFERED:
            continue
        m = store.manifest(job.package)
        if m is None:
            continue
        out.append(
            {
                "id": m.id,
                "name": m.name,
                "version": m.version,
                "size": m.size,
                "offered": iso(dest.updated),
                "expires": iso(m.expires),
                "job": job.id,
            }
        )
    return out


def progress_fields(p: Progress | None) -> dict[str, Any]:
    """Bytes, rate (bytes/s) and ETA (seconds) of a transferring destination,
    from the last two progress points; all null when unknown."""
    if p is None:
        return {"bytes_done": None, "bytes_total": None, "rate": None, "eta": None}
    rate, eta = p.rate, p.eta
    return {
        "bytes_done": p.done,
        "bytes_total": p.total,
        "rate": round(rate, 1) if rate is not None else None,
        "eta": round(eta, 1) if eta is not None else None,
    }


def allowed_names(roles: list[Role]) -> list[str]:
    return [f"a {r.value}" for r in roles]


__all__ = [
    "Admin",
    "PackageInfo",
    "cache_listing",
    "check_at",
    "check_package_ref",
    "offers_listing",
    "parse_time",
]
