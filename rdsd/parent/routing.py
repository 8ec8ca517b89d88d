"""Who must hear what: the parent half's routing as pure functions.

Nothing here touches a socket or the database: each function takes plain
records (job and destination rows, the route table, the set of connected
children) and returns what to send or record. The parent half does the I/O.
Unit tests drive these directly.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from protocol import MAX_REVOKED_BATCH, JobCancel, Revoked

from ..claims import Attach
from ..domain import DestState, NodeClaim, Role

#: Destinations per JOB_NOTICE, so a job for any number of nodes fits a frame.
NOTICE_BATCH = 1000

#: What a child session has been told, per ``(job, node)``: the generation of
#: the last notice, or ``CANCEL_SENT``. An entry goes when the destination
#: reaches a final state, so the map is bounded by open work.
Pushed = dict[tuple[str, str], int]
CANCEL_SENT = -1


def route_name(node: str, children: Collection[str], via: str | None) -> str | None:
    """The connected child session that leads to ``node``, if any: the node
    itself when it is a connected child, else the child it is behind."""
    if node in children:
        return node
    return via if via in children else None


def in_subtree(child: str, node: str, via_of_node: str | None) -> bool:
    """Is ``node`` the child itself or reached through it?"""
    return node == child or via_of_node == child


def made_below(origin: str, child: str, via_of_origin: str | None) -> bool:
    """Was a job created at ``child`` or behind it? Then the child has it."""
    return origin == child or via_of_origin == child


def by_hop(
    me: str,
    rows: Iterable[tuple[str, DestState, int, str | None]],
    children: Collection[str],
) -> dict[str, list[tuple[str, DestState, int]]]:
    """A job's (node, state, generation, via) rows grouped by the connected
    child each is reached through; rows with no live route, and our own, are
    left out."""
    out: dict[str, list[tuple[str, DestState, int]]] = {}
    for node, state, generation, via in rows:
        if node == me:
            continue
        hop = route_name(node, children, via)
        if hop is not None:
            out.setdefault(hop, []).append((node, state, generation))
    return out


@dataclass
class JobPush:
    """What one child must hear about one job: notices by generation (each
    list at most NOTICE_BATCH long) and destinations to cancel."""

    notices: list[tuple[int, list[str]]] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)


def plan_push(
    job: str,
    items: Iterable[tuple[str, DestState, int]],
    pushed: Mapping[tuple[str, str], int],
    fresh_only: bool,
) -> tuple[JobPush, Pushed]:
    """What a child must be told about ``job`` for ``items`` (node, state,
    generation), and the marks to record. With ``fresh_only``, what this
    session was already told is skipped; a cancel is told once per session."""
    by_generation: dict[int, list[str]] = {}
    cancels: list[str] = []
    marks: Pushed = {}
    for node, state, generation in items:
        key = (job, node)
        if state is DestState.CANCELLED:
            if pushed.get(key) != CANCEL_SENT:
                cancels.append(node)
                marks[key] = CANCEL_SENT
            continue
        if fresh_only and pushed.get(key) == generation:
            continue
        by_generation.setdefault(generation, []).append(node)
        marks[key] = generation
    push = JobPush(
        notices=[
            (generation, nodes[i : i + NOTICE_BATCH])
            for generation, nodes in by_generation.items()
            for i in range(0, len(nodes), NOTICE_BATCH)
        ],
        cancels=cancels,
    )
    return push, marks


@dataclass
class TopologyPlan:
    """What a relay's TOPOLOGY changes: routes to move to it (name, role,
    attach claim, its counter, the parent it names), every node it now
    leads to, and claims refused (name, reason)."""

    moves: list[tuple[str, str, bytes, int, str]] = field(default_factory=list)
    keep: set[str] = field(default_factory=set)
    refused: list[tuple[str, str]] = field(default_factory=list)


def judge_topology(
    me: str,
    child: str,
    claims: Mapping[str, Attach],
    known: Mapping[str, NodeClaim],
    live: Collection[str],
) -> TopologyPlan:
    """Which of a relay's claimed routes to believe. ``claims`` are the
    attach claims it carried, each already checked to be the named node's
    own (its signature, on the server); ``known`` what this node knows of
    the claimed nodes and of the parents they name; ``live`` the connected
    children.

    A route to N through ``child`` is believed only if N's claim is its
    newest (a counter below the newest accepted, or the same counter with
    other bytes, is a replay) and names ``child`` or a relay whose own route
    is believed through ``child``, in this message or before it: the chain
    of claims leads from N up to the relay. A node connected to us directly
    stays ours; a revoked node is left out."""
    plan = TopologyPlan(keep={child})
    candidates: dict[str, Attach] = {}
    for name, claim in claims.items():
        if name in (me, child) or name in live:
            continue
        row = known.get(name)
        if row is not None and row.revoked:
            continue
        if (
            row is not None
            and row.counter is not None
            and (
                claim.counter < row.counter
                or (claim.counter == row.counter and row.claim != claim.raw)
            )
        ):
            plan.refused.append((name, f"not {name}'s newest attach claim (a replay)"))
            continue
        candidates[name] = claim
    proven: dict[str, bool] = {}

    def parent_ok(parent: str) -> bool | None:
        """Is ``parent`` a relay believed to lead through ``child``? None
        when that depends on another claim of this message."""
        if parent == child:
            return True
        if parent in candidates:
            if candidates[parent].role != Role.RELAY:
                return False
            return proven.get(parent)
        row = known.get(parent)
        return (
            row is not None
            and row.role == Role.RELAY
            and row.via == child
            and not row.revoked
            and row.claim is not None
        )

    for name in candidates:
        # Walk up the claimed parents until one is decided, then settle the
        # whole path (a cycle, or a parent not proven, refuses it).
        path: list[str] = []
        at = name
        verdict: bool | None = None
        while verdict is None:
            if at in proven:
                verdict = proven[at]
                break
            if at in path:
                verdict = False
                break
            path.append(at)
            verdict = parent_ok(candidates[at].parent)
            if verdict is None:
                at = candidates[at].parent
        for step in path:
            proven[step] = verdict
    for name, claim in candidates.items():
        if not proven[name]:
            plan.refused.append((name, f"its parent {claim.parent} is not proven below {child}"))
            continue
        plan.keep.add(name)
        row = known.get(name)
        if row is None or row.via != child or row.claim != claim.raw:
            plan.moves.append((name, claim.role, claim.raw, claim.counter, claim.parent))
    return plan


def revoked_batches(revoked: list[str]) -> list[Revoked]:
    """The revocation list as REVOKED messages of at most
    ``MAX_REVOKED_BATCH`` names, all but the last marked ``more``; an empty
    list is one empty message (it clears the relay's list)."""
    parts = [
        revoked[i : i + MAX_REVOKED_BATCH] for i in range(0, len(revoked), MAX_REVOKED_BATCH)
    ] or [[]]
    return [Revoked(nodes=part, more=i < len(parts) - 1) for i, part in enumerate(parts)]


def cancel_batches(job: str, nodes: list[str]) -> list[JobCancel]:
    """JOB_CANCEL messages for ``nodes``, at most ``NOTICE_BATCH`` each, so
    cancelling a job for any number of nodes fits the header cap."""
    return [
        JobCancel(job=job, destinations=nodes[i : i + NOTICE_BATCH])
        for i in range(0, len(nodes), NOTICE_BATCH)
    ]
