"""The admin API: setting up homes (``setup``) and operating on one
(``ops``), and the same for asyncio programs (``aio``). The command line is
a thin client of these."""

from typing import TYPE_CHECKING

from ..util.lazy import lazy_exports

if TYPE_CHECKING:
    from .aio import AsyncAdmin
    from .ops import Admin, PackageInfo, cache_listing, offers_listing, parse_time
    from .setup import enroll, init_node, init_server

#: Where each name lives, imported on first use: ``AsyncAdmin`` attaches to
#: a running Node, so it imports the whole node, and ``setup`` makes
#: certificates (the cryptography package's x509); a command that reads the
#: job database needs neither.
_EXPORTS: dict[str, str] = {
    "Admin": ".ops",
    "AsyncAdmin": ".aio",
    "PackageInfo": ".ops",
    "cache_listing": ".ops",
    "enroll": ".setup",
    "init_node": ".setup",
    "init_server": ".setup",
    "offers_listing": ".ops",
    "parse_time": ".ops",
}


__getattr__ = lazy_exports(__name__, _EXPORTS, globals())

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
