"""The typed admin API behind every ``rdsd`` and ``rdsft`` command.

Admin operations act on a home directory: they write the job database and
the store, and a running daemon on that home notices within its poll
interval (it watches SQLite's ``data_version``), so no restart and no
control socket are needed. Embedders call the same functions the CLI does.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from protocol import is_destination, is_package_id, is_safe_name

from ..config import DEFAULT_KEEP, NodeConfig, iso
from ..domain import DestState, Job, JobType, Role
from ..errors import AdminError, JobError
from ..packages.manifest import Envelopes, build_manifest, seal
from ..packages.packing import pack_directory
from ..packages.store import Store
from ..security import Signer, Verifier
from ..state import JobDB
from ..util.fsutil import commit_file, removing_on_error, temp_name


def parse_time(text: str) -> float:
    """ISO 8601; a time without zone is taken as UTC."""
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise AdminError(f"time {text!r} is not ISO 8601 (like 2026-12-01T22:00:00Z)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


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
        envelopes = Envelopes(Verifier(self.paths.signing_pub.read_bytes()))
        self.store = Store(self.paths.store, envelopes)

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
        return Signer(self.paths.signing_key.read_bytes())

    # -- packages ------------------------------------------------------------------

    def add_package(
        self,
        src: Path,
        name: str,
        version: str,
        install: str | None = None,
        keep: int = DEFAULT_KEEP,
    ) -> str:
        self.require_role(Role.SERVER)
        pid = f"{name}-{version}"
        if not (is_safe_name(name) and is_safe_name(version) and is_package_id(pid)):
            raise AdminError(f"package name and version must match [A-Za-z0-9._-]{{1,64}}: {pid!r}")
        if not src.is_dir():
            raise AdminError(f"{src} is not a directory")
        self.store.prepare()
        if self.store.has(pid):
            raise AdminError(f"package {pid} already exists; a name and version are immutable")
        argv = tuple(shlex.split(install)) if install else ()
        target = self.store.data_path(pid)
        tmp = temp_name(target)
        with removing_on_error(tmp):
            pack_directory(src, tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            manifest = build_manifest(tmp, name, version, argv, keep, self.cfg.chunk_size)
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

    def keep_package(self, pid: str, keep: int) -> PackageInfo:
        """Re-sign the manifest with a new keep duration. Relays learn it when
        the package is transferred to them again."""
        self.require_role(Role.SERVER)
        m = self.store.manifest(pid)
        if m is None:
            raise AdminError(f"no package {pid}")
        self.store.replace_envelope(pid, seal(m.with_keep(keep), self._signer()))
        return next(p for p in self.packages() if p.id == pid)

    # -- jobs ------------------------------------------------------------------------

    def create_job(
        self, type_: JobType | str, package: str, to: list[str], at: float | None = None
    ) -> str:
        try:
            job_type = JobType(type_)
        except ValueError:
            raise AdminError(f"--type must be one of {', '.join(JobType)}") from None
        if self.cfg.role is Role.CLIENT:
            raise AdminError("jobs are created on the server or on a relay")
        if job_type is JobType.TRANSFER and self.cfg.role is Role.RELAY:
            raise AdminError("a transfer job cannot be created on a relay; create it on the server")
        bad = [d for d in to if not is_destination(d)]
        if bad:
            raise AdminError(f"not a node name or group:NAME: {', '.join(map(repr, bad))}")
        envelope = self.store.envelope(package) if is_package_id(package) else None
        if envelope is None:
            where = "storehouse" if self.cfg.role is Role.SERVER else "relay's cache"
            raise AdminError(f"no package {package!r} in this {where}")
        try:
            nodes = self.db.expand(to)
            revoked = sorted(set(nodes) & set(self.db.revoked()))
            if revoked:
                raise AdminError(f"revoked node(s) cannot get jobs: {', '.join(revoked)}")
            if self.cfg.role is Role.RELAY:
                # A relay can reach only nodes that have connected to it (or below).
                foreign = [n for n in nodes if (row := self.db.node(n)) is None or not row.via]
                if foreign:
                    raise AdminError(f"not behind this relay: {', '.join(foreign)}")
            else:
                unknown = [n for n in nodes if self.db.node(n) is None]
                if unknown:
                    raise AdminError(f"no node named {', '.join(unknown)}; enroll it first")
            return self.db.create_job(job_type, package, nodes, envelope, at, origin=self.cfg.name)
        except JobError as exc:
            raise AdminError(str(exc)) from None

    def _job(self, jid: str) -> Job:
        job = self.db.job(jid) if is_safe_name(jid) else None
        if job is None:
            raise AdminError(f"no job {jid!r}")
        return job

    def retry(self, jid: str) -> list[str]:
        """Run the failed destinations of a job again; the others stay."""
        job = self._job(jid)
        if job.origin != self.cfg.name:
            raise AdminError(f"job {jid} was made at {job.origin}; retry it there")
        nodes = self.db.reset_failed(jid)
        if not nodes:
            raise AdminError(f"job {jid} has no failed destinations")
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
        return nodes

    def job_status(self, jid: str) -> dict[str, Any]:
        job = self._job(jid)
        return {
            "id": job.id,
            "type": job.type,
            "package": job.package,
            "created": iso(job.created),
            "at": iso(job.at),
            "origin": job.origin,
            "destinations": [
                {"node": d.node, "state": d.state, "detail": d.detail, "updated": iso(d.updated)}
                for d in self.db.dests(job.id)
            ],
        }

    def jobs(self) -> list[dict[str, Any]]:
        out = []
        for job in self.db.jobs():
            dests = self.db.dests(job.id)
            counts: dict[str, int] = {}
            for d in dests:
                counts[d.state] = counts.get(d.state, 0) + 1
            out.append(
                {
                    "id": job.id,
                    "type": job.type,
                    "package": job.package,
                    "created": iso(job.created),
                    "at": iso(job.at),
                    "states": counts,
                    "done": all(d.final for d in dests),
                }
            )
        return out

    # -- nodes and groups ----------------------------------------------------------------

    def add_group(self, name: str, members: list[str]) -> None:
        bad = [m for m in [name, *members] if not is_safe_name(m)]
        if bad:
            raise AdminError(f"not a valid name: {', '.join(map(repr, bad))}")
        self.db.add_group(name, members)

    def nodes(self) -> list[dict[str, Any]]:
        held = self.db.holdings()
        installed = self.db.installed()
        return [
            {
                "name": n.name,
                "role": n.role,
                "via": n.via,
                "last_seen": iso(n.last_seen),
                "revoked": n.revoked,
                "installed": installed.get(n.name, []),
                "holds": [
                    {"package": p, "expires": iso(e)}
                    for p, e in sorted(held.get(n.name, {}).items())
                ],
            }
            for n in self.db.nodes()
        ]

    def revoke(self, name: str) -> None:
        self.require_role(Role.SERVER)
        if not self.db.revoke(name):
            raise AdminError(f"no node {name!r}")

    def cache(self) -> list[dict[str, Any]]:
        self.require_role(Role.RELAY)
        return cache_listing(self.store)


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


def allowed_names(roles: list[Role]) -> list[str]:
    return [f"a {r.value}" for r in roles]


__all__ = ["Admin", "PackageInfo", "cache_listing", "offers_listing", "parse_time"]
