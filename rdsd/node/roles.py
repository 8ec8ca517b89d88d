"""What each role is made of, as data.

A relay is a client towards its parent and a server towards its children,
so every role is assembled from the same two halves; this table says which
parts each one has, and the node builds exactly those. No other code asks
"am I a relay?" to decide what exists.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..domain import Role


@dataclass(frozen=True)
class RoleParts:
    parent_half: bool  # accepts children and serves them
    child_half: bool  # keeps a session to a parent and fetches from it
    runs_jobs: bool  # does jobs addressed to itself (transfer on relays, others on clients)
    forwards_up: bool  # passes reports and jobs from below on to its own parent
    refetchable: bool  # a damaged stored package can be fetched again from a parent


ROLE_PARTS: dict[Role, RoleParts] = {
    Role.SERVER: RoleParts(
        parent_half=True, child_half=False, runs_jobs=False, forwards_up=False, refetchable=False
    ),
    Role.RELAY: RoleParts(
        parent_half=True, child_half=True, runs_jobs=True, forwards_up=True, refetchable=True
    ),
    Role.CLIENT: RoleParts(
        parent_half=False, child_half=True, runs_jobs=True, forwards_up=False, refetchable=True
    ),
}
