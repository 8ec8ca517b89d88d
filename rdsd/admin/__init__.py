"""The admin API: setting up homes (``setup``) and operating on one
(``ops``), and the same for asyncio programs (``aio``). The command line is
a thin client of these."""

from typing import TYPE_CHECKING, Any

from .ops import Admin, PackageInfo, cache_listing, offers_listing, parse_time
from .setup import enroll, init_node, init_server

if TYPE_CHECKING:
    from .aio import AsyncAdmin


def __getattr__(name: str) -> Any:
    # ``AsyncAdmin`` attaches to a running Node, so it imports the whole node;
    # the command line, which only needs ``Admin``, does not pay for that.
    if name == "AsyncAdmin":
        from .aio import AsyncAdmin

        return AsyncAdmin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Admin",
    "AsyncAdmin",
    "PackageInfo",
    "cache_listing",
    "enroll",
    "init_node",
    "init_server",
    "offers_listing",
    "parse_time",
]
