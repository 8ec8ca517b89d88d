"""Node composition: the roles as data (``roles``), the running node
(``node``), its background duties (``housekeeping``), doing its own jobs
(``runner``) and running install commands (``install``)."""

from typing import TYPE_CHECKING

from ..util.lazy import lazy_exports

if TYPE_CHECKING:
    from .node import Node

# ``Node`` brings both halves of every role (the parent's downlinks
# included); ``rdsft``, which imports ``node.runner`` to do a client's own
# jobs, does not pay for them.
__getattr__ = lazy_exports(__name__, {"Node": ".node"}, globals())


__all__ = ["Node"]
