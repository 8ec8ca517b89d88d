"""rdsd's vocabulary: roles, job types, destination states, and the records
that every layer above the wire passes around.

Everything that used to be a bare string (a state in SQL, a role compared in
the parent half, a HELLO purpose) is one of these enums, so a typo is a type
error and a reader finds every value in one place. The destination lifecycle
is the table ``DEST_TRANSITIONS``: the job database refuses any change it
does not list, whether the change is made here or reported from below.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    """What a node is; the certificate's OU carries it."""

    SERVER = "server"
    RELAY = "relay"
    CLIENT = "client"


class JobType(StrEnum):
    INSTALL = "install"  # deliver to clients and run the install command
    TRANSFER = "transfer"  # deliver to relays, kept there until expiry
    OFFER = "offer"  # deliver to clients; a local user chooses when to install


class DestState(StrEnum):
    """Where one destination of one job stands."""

    WAITING = "waiting"
    TRANSFERRING = "transferring"
    INSTALLING = "installing"
    STORED = "stored"
    OFFERED = "offered"
    INSTALLED = "installed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        """No more work happens for this destination unless someone retries."""
        return self in FINAL_STATES


class HelloPurpose(StrEnum):
    """Why a child connects: a daemon's long-lived link becomes the route to
    the node; a one-shot ``rdsft -a`` query never does."""

    SESSION = "session"
    QUERY = "query"


S = DestState
FINAL_STATES = frozenset({S.STORED, S.OFFERED, S.INSTALLED, S.FAILED, S.CANCELLED})
_PROGRESS = frozenset({S.WAITING, S.TRANSFERRING})
_ANY_OUTCOME = frozenset({S.INSTALLING, S.STORED, S.OFFERED, S.INSTALLED, S.FAILED, S.CANCELLED})

#: The destination lifecycle: ``old -> the states it may move to``. A move
#: to the same state is how progress details are updated. ``WAITING`` is
#: reachable from every final state but ``CANCELLED`` because a retry (a
#: newer generation) starts a destination over. A cancelled destination
#: still takes a real outcome reported from below (the node did finish
#: before it heard of the cancel), so status tells the truth.
DEST_TRANSITIONS: dict[DestState, frozenset[DestState]] = {
    S.WAITING: _PROGRESS | _ANY_OUTCOME,
    S.TRANSFERRING: _PROGRESS | _ANY_OUTCOME,
    S.INSTALLING: frozenset({S.INSTALLING, S.INSTALLED, S.FAILED, S.CANCELLED}),
    S.OFFERED: frozenset({S.OFFERED, S.WAITING, S.INSTALLING, S.INSTALLED, S.FAILED, S.CANCELLED}),
    S.STORED: frozenset({S.STORED, S.WAITING, S.FAILED, S.CANCELLED}),
    S.INSTALLED: frozenset({S.INSTALLED, S.WAITING}),
    S.FAILED: frozenset({S.FAILED, S.WAITING, S.INSTALLED, S.STORED, S.OFFERED}),
    S.CANCELLED: frozenset({S.CANCELLED, S.STORED, S.OFFERED, S.INSTALLED, S.FAILED}),
}


def can_move(old: DestState, new: DestState) -> bool:
    """Is ``old -> new`` a move the destination lifecycle allows?"""
    return new in DEST_TRANSITIONS[old]


#: States a newer generation (a retry upstream) may start over from.
RESTARTABLE = frozenset(s for s in DestState if can_move(s, S.WAITING))


#: How far ahead of this node's clock a child's timestamp (a REPORT's
#: ``time``) may be before it is cut back to this node's clock plus this.
#: Each node enforces time with its own clock: a relay expires its cache by
#: its clock, a parent records ``last_seen``/``updated`` bounded by its own.
CLOCK_SKEW = 300.0


#: The role a destination must have for each job type.
TARGET_ROLE: dict[JobType, Role] = {
    JobType.INSTALL: Role.CLIENT,
    JobType.OFFER: Role.CLIENT,
    JobType.TRANSFER: Role.RELAY,
}

#: The state a destination ends in when a job of that type succeeds.
SUCCESS_STATE: dict[JobType, DestState] = {
    JobType.INSTALL: S.INSTALLED,
    JobType.TRANSFER: S.STORED,
    JobType.OFFER: S.OFFERED,
}


@dataclass(frozen=True, slots=True)
class JobHead:
    """A job without its envelope: what routing and listings need. The
    envelope is looked up by job id only where it is sent or opened."""

    id: str
    type: JobType
    package: str
    created: float
    at: float | None
    origin: str


@dataclass(frozen=True, slots=True)
class Job:
    """A job as a node's database holds it. ``manifest`` is the server-signed
    envelope of the package."""

    id: str
    type: JobType
    package: str
    created: float
    at: float | None
    origin: str
    manifest: bytes


@dataclass(frozen=True, slots=True)
class IncomingJob:
    """A job pushed by the parent, or announced from below, before it is
    recorded. ``generation`` grows each time the origin retries it."""

    id: str
    type: JobType
    package: str
    destinations: list[str]
    envelope: bytes
    at: float | None
    origin: str
    generation: int = 0


@dataclass(frozen=True, slots=True)
class Dest:
    """One destination of one job."""

    job: str
    node: str
    state: DestState
    detail: str
    updated: float
    attempts: int
    generation: int

    @property
    def final(self) -> bool:
        return self.state.final


@dataclass(frozen=True, slots=True)
class NodeRow:
    """A node this node knows of: itself, a child, or a node behind a child
    (``via`` names the child it is reached through)."""

    name: str
    role: str
    via: str | None
    last_seen: float | None
    revoked: bool
