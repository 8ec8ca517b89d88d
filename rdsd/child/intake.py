"""Taking in a JOB_NOTICE from the parent: written once, for the daemon and
for ``rdsft``.

The envelope must be the server's and name the notice's package; the
destinations are split into this node's own and those below it (a client
has nothing below it, so any such destination is a routing mistake upstream
and is dropped with a warning). What is accepted is recorded in the job
database, where a repeated notice changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from protocol import JobNotice

from ..domain import IncomingJob, JobType, Role
from ..errors import ManifestError
from ..packages.manifest import Envelopes, Manifest
from ..state import JobDB
from ..util.windows import pace_from_wire

log = structlog.get_logger("rdsd.node")


@dataclass(frozen=True)
class Accepted:
    """A notice recorded: its manifest, and the destinations below this node."""

    manifest: Manifest
    below: list[str]


class JobIntake:
    def __init__(self, name: str, role: Role, db: JobDB, envelopes: Envelopes) -> None:
        self.name = name
        self.role = role
        self.db = db
        self.envelopes = envelopes
        self.log = log.bind(node=name)

    def accept(self, notice: JobNotice, only_mine: bool = False) -> Accepted | None:
        """Record ``notice``; with ``only_mine`` keep just this node's own
        destination (``rdsft -a`` asks for nothing else). None if refused or
        if nothing in it is for us."""
        try:
            manifest = self.envelopes.open_for(notice.manifest, notice.package)
            job_type = JobType(notice.type)
            pace = pace_from_wire(notice.rate, notice.windows)
        except (ManifestError, ValueError) as exc:
            self.log.error("job.rejected", job=notice.job, package=notice.package, reason=str(exc))
            return None
        mine = [d for d in notice.destinations if d == self.name]
        below = [d for d in notice.destinations if d != self.name]
        if only_mine:
            below = []
        elif below and self.role is not Role.RELAY:
            self.log.warning("job.misrouted", job=notice.job, dests=below)
            below = []
        if not mine and not below:
            return None
        self.db.receive_job(
            IncomingJob(
                id=notice.job,
                type=job_type,
                package=notice.package,
                destinations=mine + below,
                envelope=notice.manifest,
                at=notice.at,
                origin=notice.origin or "",
                generation=notice.generation,
                pace=pace,
            )
        )
        self.log.info(
            "job.received",
            job=notice.job,
            package=notice.package,
            type=job_type,
            dests=notice.destinations,
        )
        return Accepted(manifest, below)
