"""Node composition: the roles as data (``roles``), the running node
(``node``), its background duties (``housekeeping``), doing its own jobs
(``runner``) and running install commands (``install``)."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .node import Node


def __getattr__(name: str) -> Any:
    # ``Node`` brings both halves of every role (the parent's downlinks
    # included); ``rdsft``, which imports ``node.runner`` to do a client's
    # own jobs, does not pay for them.
    if name == "Node":
        from .node import Node

        globals()["Node"] = Node
        return Node
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Node"]
