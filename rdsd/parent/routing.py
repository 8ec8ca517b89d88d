"""Who must hear what: the parent half's routing as pure functions.

Nothing here touches a socket or the database: each function takes plain
records (job and destination rows, the route table, the set of connected
children) and returns what to send or record. The parent half does the I/O.
Unit tests drive these directly.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from ..domain import DestState

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
    """What a relay's TOPOLOGY changes: routes to move to it (name, role),
    every node it now leads to, and claims refused (name, current route)."""

    moves: list[tuple[str, str]] = field(default_factory=list)
    keep: set[str] = field(default_factory=set)
    refused: list[tuple[str, str]] = field(default_factory=list)


def judge_topology(
    me: str,
    child: str,
    claimed: Mapping[str, str],
    known: Mapping[str, tuple[str, str | None, bool]],
    live: Collection[str],
) -> TopologyPlan:
    """A relay's TOPOLOGY replaces its last one. A node already reached
    through another connected child stays there: a relay cannot pull a node
    away from a live route by claiming it. ``known`` maps name to (role,
    via, revoked); ``live`` is the set of connected children."""
    plan = TopologyPlan(keep={child})
    for name, role in claimed.items():
        if name in (me, child) or name in live:
            continue
        row = known.get(name)
        if row is not None and row[2]:
            continue
        if row is not None and row[1] not in (None, child) and row[1] in live:
            plan.refused.append((name, str(row[1])))
            continue
        plan.keep.add(name)
        if row is None or row[1] != child:
            plan.moves.append((name, row[0] if row is not None and row[0] != "unknown" else role))
    return plan
