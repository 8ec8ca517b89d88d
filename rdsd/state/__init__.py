"""A node's durable state: one SQLite database, split by concern.

``JobDB`` is the one object the rest of the node holds; each concern lives
in its own module (``jobs``, ``outbox``, ``nodes``, ``inventory``) over the
shared connection in ``base``.
"""

from __future__ import annotations

from .jobs import Applied, JobsMixin, new_job_id
from .nodes import NodesMixin


class JobDB(JobsMixin, NodesMixin):
    """Jobs, destination states, the report outbox, nodes, groups and
    inventory of one node, behind one connection."""


__all__ = ["Applied", "JobDB", "new_job_id"]
