"""rdsd's vocabulary: roles, job types, destination states, and the records
that every layer above the wire passes around.

Everything that used to be a bare string (a state in SQL, a role compared in
the parent half, a HELLO purpose) is one of these enums, so a typo is a type
error and a reader finds every value in one place. The destination lifecycle
is the table ``DEST_TRANSITIONS``: the job database refuses any change it
does not list, whether the change is made here or reported from below.
"""

from __future__ import annotations

import re
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
    the node; a one-shot ``rdsft -a`` query never does, nor does a lane."""

    SESSION = "session"
    QUERY = "query"
    #: A connection of its own for one package fetch (SPEC section 6a): never
    #: a route, never a session; its bytes are moved by a thread.
    LANE = "lane"


S = DestState
FINAL_STATES = frozenset({S.STORED, S.OFFERED, S.INSTALLED, S.FAILED, S.CANCELLED})
_PROGRESS = frozenset({S.WAITING, S.TRANSFERRING})
_ANY_OUTCOME = frozenset({S.INSTALLING, S.STORED, S.OFFERED, S.INSTALLED, S.FAILED, S.CANCELLED})

#: The destination lifecycle: ``old -> the states it may move to``. A move
#: to the same state is how progress details are updated. ``WAITING`` is
#: reachable from every final state but ``CANCELLED`` because a retry (a
#: newer generation) starts a destination over. A cancelled destination
#: still takes a real outcome reported from below (the node did finish
#: before it heard of the cancel), so status tells the truth. ``installed``
#: comes only after ``installing`` (or an offer, a failure or a cancel that
#: the node's real outcome overtakes): a node cannot skip the install. (A
#: parent may hear ``installed`` before the ``installing`` it followed:
#: ``can_report``.)
DEST_TRANSITIONS: dict[DestState, frozenset[DestState]] = {
    S.WAITING: _PROGRESS | (_ANY_OUTCOME - {S.INSTALLED}),
    S.TRANSFERRING: _PROGRESS | (_ANY_OUTCOME - {S.INSTALLED}),
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


#: States a node passes through on its way to an outcome. Their reports can
#: be overtaken: a node that moves to another relay, or whose relay holds its
#: older reports while it is down, has its newer ones arrive first.
PASSING = frozenset({S.TRANSFERRING, S.INSTALLING})


def can_report(old: DestState, new: DestState) -> bool:
    """May a report from below move ``old -> new``? Any move of the table,
    or one over a passing state whose report has not arrived yet
    (``waiting -> installed`` for ``waiting -> installing -> installed``).
    The node itself made only moves of the table (``JobDB.change``); its
    ``seq`` says which report is newest, and the overtaken ones are repeats
    when they come. Nothing more is let through: ``installed`` still
    follows ``installing`` at the node, and a late report still cannot
    reopen a cancel or undo an outcome."""
    return can_move(old, new) or any(can_move(old, s) and can_move(s, new) for s in PASSING)


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


Window = tuple[int, int]


@dataclass(frozen=True, slots=True)
class JobPace:
    """How a job may move: ``rate`` bytes per second on every hop it crosses
    (0: no limit of its own) and the windows (minutes after local
    midnight, as ``parse_window`` gives them) its transfers and installs
    keep to (none: any time)."""

    rate: float = 0.0
    windows: tuple[Window, ...] = ()


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
    pace: JobPace = JobPace()


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


@dataclass(frozen=True, slots=True)
class NodeClaim:
    """What a parent knows of a node for judging claims about it: its role,
    the child session it is routed through, whether it is revoked, the
    public key of the certificate issued to it (the server only; None for a
    node never enrolled here), and the newest attach claim accepted for it
    (raw, counter, the parent it names)."""

    name: str
    role: str
    via: str | None
    revoked: bool
    pubkey: bytes | None
    claim: bytes | None
    counter: int | None
    parent: str | None


class JobFilter(StrEnum):
    """What ``rdsd job list --state`` selects."""

    RUNNING = "running"  # some destination is not final yet
    FAILED = "failed"  # some destination failed
    DONE = "done"  # every destination is final


# -- progress of a transfer, carried in the detail of ``transferring`` reports --

_PROGRESS_RE = re.compile(r"\[bytes (\d+)/(\d+)\]$")


def progress_detail(done: int, total: int, note: str = "") -> str:
    """The detail of a ``transferring`` report: a human part, then the
    machine-readable ``[bytes DONE/TOTAL]`` suffix that protocol/SPEC.md
    documents under REPORT, so every node above can compute rate and ETA.
    ``note`` joins the human part (``paced at 1MB/s``)."""
    mib = 1024 * 1024
    pct = 100 * done // max(total, 1)
    extra = f", {note}" if note else ""
    return f"{pct}% ({done / mib:.1f} of {total / mib:.1f} MiB{extra}) [bytes {done}/{total}]"


def parse_progress(detail: str) -> tuple[int, int] | None:
    """``(done, total)`` from a detail written by ``progress_detail``, or None
    for a detail without the suffix or with impossible figures."""
    m = _PROGRESS_RE.search(detail)
    if m is None:
        return None
    done, total = int(m.group(1)), int(m.group(2))
    return (done, total) if 0 <= done <= total else None


@dataclass(frozen=True)
class Progress:
    """The last two progress points of one transferring destination."""

    done: int
    total: int
    time: float
    prev_done: int | None
    prev_time: float | None

    @property
    def rate(self) -> float | None:
        """Bytes per second between the last two points; None if unknown."""
        if self.prev_done is None or self.prev_time is None or self.time <= self.prev_time:
            return None
        moved = self.done - self.prev_done
        return moved / (self.time - self.prev_time) if moved >= 0 else None

    @property
    def eta(self) -> float | None:
        """Seconds until the end at the current rate; None if unknown."""
        rate = self.rate
        if rate is None or rate <= 0:
            return 0.0 if self.done >= self.total else None
        return (self.total - self.done) / rate


@dataclass(frozen=True)
class PresenceRow:
    """Whether a node is connected now, as far as this node can tell.
    ``parent`` is what it is directly connected to; ``through`` is this
    node's child session the news came over."""

    name: str
    parent: str
    software: str
    through: str
    online: bool
    since: float
    seen: float
