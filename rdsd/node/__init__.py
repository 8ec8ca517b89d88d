"""Node composition: the roles as data (``roles``), the running node
(``node``), its background duties (``housekeeping``), doing its own jobs
(``runner``) and running install commands (``install``)."""

from .node import Node

__all__ = ["Node"]
