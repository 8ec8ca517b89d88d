"""Names a package exports but imports only when first used (PEP 562).

A command that prints a listing imports ``rdsd`` and ``rdsd.admin`` first;
with every export imported eagerly it paid for the whole daemon (TLS,
certificates, the store) before reading one row. ``protocol/__init__.py``
keeps its own copy of these few lines: the wire package imports nothing of
rdsd.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str], namespace: dict[str, Any]
) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: a name in ``exports`` is
    imported from its module (relative to ``package``) on first use and kept
    in ``namespace`` (the module's globals), so later lookups are plain."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    return __getattr__
