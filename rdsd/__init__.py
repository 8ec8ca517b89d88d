"""rdsd: software distribution from one managing server, through relays, to
every client.

What an embedder needs is exported here: run a node with
``async with Node(NodeConfig.load(home)) as node``, drive it from asyncio
with ``AsyncAdmin`` (``Admin`` is the same API, synchronous, for scripts;
homes are set up with ``init_server``, ``enroll``, ``init_node``), follow
it with ``node.events(...)`` (the event types below), read states as
``DestState`` and catch ``RdsdError`` (``UserError`` for requests that
cannot be done as asked). Everything else is internal layering; see
``docs/DESIGN.md`` for the map.
"""

from importlib.metadata import PackageNotFoundError, version

from .admin import Admin, AsyncAdmin, enroll, init_node, init_server
from .config import HomePaths, NodeConfig
from .domain import DestState, HelloPurpose, JobPace, JobType, Role
from .errors import (
    AdminError,
    ConfigError,
    CorruptChunk,
    DiskFull,
    IllegalTransition,
    JobError,
    ManifestError,
    PackingError,
    PeerError,
    RdsdError,
    SecurityError,
    SessionClosed,
    StoreError,
    TransferFailed,
    UserError,
)
from .events import (
    ChildConnected,
    ChildDisconnected,
    DestChanged,
    Event,
    EventBus,
    EventBusClosed,
    EventsDropped,
    JobReceived,
    PackageExpired,
    PackageStored,
    Subscription,
    TransferProgress,
)
from .net.observe import TrafficObserver
from .node import Node

try:
    __version__ = version("rdsd")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0+unknown"

__all__ = [
    "Admin",
    "AdminError",
    "AsyncAdmin",
    "ChildConnected",
    "ChildDisconnected",
    "ConfigError",
    "CorruptChunk",
    "DestChanged",
    "DestState",
    "DiskFull",
    "Event",
    "EventBus",
    "EventBusClosed",
    "EventsDropped",
    "HelloPurpose",
    "HomePaths",
    "IllegalTransition",
    "JobError",
    "JobPace",
    "JobReceived",
    "JobType",
    "ManifestError",
    "Node",
    "NodeConfig",
    "PackageExpired",
    "PackageStored",
    "PackingError",
    "PeerError",
    "RdsdError",
    "Role",
    "SecurityError",
    "SessionClosed",
    "StoreError",
    "Subscription",
    "TrafficObserver",
    "TransferFailed",
    "TransferProgress",
    "UserError",
    "__version__",
    "enroll",
    "init_node",
    "init_server",
]
