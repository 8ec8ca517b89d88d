"""Who must hear what: the parent half's routing as pure functions.

Nothing here touches a socket or the database: each function takes plain
records (job and destination rows, the route table, the set of connected
children) and returns what to send or record. The parent half does the I/O.
Unit tests drive these directly.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from ..domain import Dest, Job

#: Destinations per JOB_NOTICE, so a job for any number of nodes fits a frame.
NOTICE_BATCH = 1000

#: ``(job, node, generation)`` of a notice already pushed over a session;
#: generation -1 marks a cancel.
Pushed = tuple[str, str, int]


def route_name(
    node: str, children: Collection[str], via: Mapping[str, str | None]
) -> str | None:
    """The connected child session that leads to ``node``, if any: the node
    itself when it is a connected child, else the child it is behind."""
    if node in children:
        return node
    hop = via.get(node)
    return hop if hop in children else None


def in_subtree(child: str, node: str, via_of_node: str | None) -> bool:
    """Is ``node`` the child itself or reached through it?"""
    return node == child or via_of_node == child


def made_below(job: Job, child: str, via: Mapping[str, str | None]) -> bool:
    """Was ``job`` created at ``child`` or behind it? Then the child has it."""
    return job.origin == child or via.get(job.origin) == child


def route_work(
    work: Iterable[tuple[Job, Dest]],
    me: str,
    children: Collection[str],
    via: Mapping[str, str | None],
) -> dict[str, list[tuple[Job, Dest]]]:
    """Open work grouped by the child session each destination is reached
    through; destinations with no live route (and our own) are left out."""
    out: dict[str, list[tuple[Job, Dest]]] = {}
    for job, dest in work:
        if dest.node == me:
            continue
        hop = route_name(dest.node, children, via)
        if hop is not None:
            out.setdefault(hop, []).append((job, dest))
    return out


def route_cancels(
    cancelled: Iterable[tuple[str, list[str]]],
    children: Collection[str],
    via: Mapping[str, str | None],
) -> dict[str, list[tuple[str, str]]]:
    """Cancelled ``(job, node)`` pairs grouped by the child session they are
    reached through."""
    out: dict[str, list[tuple[str, str]]] = {}
    for jid, nodes in cancelled:
        for node in nodes:
            hop = route_name(node, children, via)
            if hop is not None:
                out.setdefault(hop, []).append((jid, node))
    return out


@dataclass(frozen=True)
class NoticePlan:
    """One JOB_NOTICE to send: a job, a generation and a batch of nodes."""

    job: Job
    generation: int
    nodes: list[str]


def plan_notices(
    child: str,
    items: Iterable[tuple[Job, Dest]],
    via: Mapping[str, str | None],
    pushed: Collection[Pushed],
    fresh_only: bool,
) -> tuple[list[NoticePlan], list[Pushed]]:
    """The notices ``child`` must get for ``items``, batched per job and
    generation, and the keys to remember as pushed. With ``fresh_only``,
    what was pushed over this session before is skipped."""
    batches: dict[tuple[str, int], tuple[Job, list[str]]] = {}
    keys: list[Pushed] = []
    for job, dest in items:
        if made_below(job, child, via):
            continue
        key = (job.id, dest.node, dest.generation)
        if fresh_only and key in pushed:
            continue
        keys.append(key)
        batches.setdefault((job.id, dest.generation), (job, []))[1].append(dest.node)
    plans = [
        NoticePlan(job, generation, nodes[i : i + NOTICE_BATCH])
        for (_, generation), (job, nodes) in batches.items()
        for i in range(0, len(nodes), NOTICE_BATCH)
    ]
    return plans, keys


def plan_cancels(
    cancelled: Iterable[tuple[str, str]], pushed: Collection[Pushed]
) -> tuple[dict[str, list[str]], list[Pushed]]:
    """JOB_CANCELs a child has not had on this session: job -> nodes."""
    todo: dict[str, list[str]] = {}
    keys: list[Pushed] = []
    for jid, node in cancelled:
        key = (jid, node, -1)
        if key not in pushed:
            keys.append(key)
            todo.setdefault(jid, []).append(node)
    return todo, keys


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
