"""The admin API: setting up homes (``setup``) and operating on one
(``ops``), and the same for asyncio programs (``aio``). The command line is
a thin client of these."""

from .aio import AsyncAdmin
from .ops import Admin, PackageInfo, cache_listing, offers_listing, parse_time
from .setup import enroll, init_node, init_server

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
