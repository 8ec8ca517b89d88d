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

from typing import TYPE_CHECKING

from ._version import VERSION as __version__
from .util.lazy import lazy_exports

if TYPE_CHECKING:
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


#: Where each exported name lives; imported on first use, so that the
#: command line (which imports this package first) does not pay for the
#: whole daemon to print a listing.
_EXPORTS: dict[str, str] = {
    "Admin": ".admin",
    "AdminError": ".errors",
    "AsyncAdmin": ".admin",
    "ChildConnected": ".events",
    "ChildDisconnected": ".events",
    "ConfigError": ".errors",
    "CorruptChunk": ".errors",
    "DestChanged": ".events",
    "DestState": ".domain",
    "DiskFull": ".errors",
    "Event": ".events",
    "EventBus": ".events",
    "EventBusClosed": ".events",
    "EventsDropped": ".events",
    "HelloPurpose": ".domain",
    "HomePaths": ".config",
    "IllegalTransition": ".errors",
    "JobError": ".errors",
    "JobPace": ".domain",
    "JobReceived": ".events",
    "JobType": ".domain",
    "ManifestError": ".errors",
    "Node": ".node",
    "NodeConfig": ".config",
    "PackageExpired": ".events",
    "PackageStored": ".events",
    "PackingError": ".errors",
    "PeerError": ".errors",
    "RdsdError": ".errors",
    "Role": ".domain",
    "SecurityError": ".errors",
    "SessionClosed": ".errors",
    "StoreError": ".errors",
    "Subscription": ".events",
    "TrafficObserver": ".net.observe",
    "TransferFailed": ".errors",
    "TransferProgress": ".events",
    "UserError": ".errors",
    "enroll": ".admin",
    "init_node": ".admin",
    "init_server": ".admin",
}


__getattr__ = lazy_exports(__name__, _EXPORTS, globals())


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
