"""The wire's rules that need no codec: the safe-name patterns every name
in a message must match, and the frame caps.

They live apart from ``messages.py`` and ``frames.py`` (which re-export
them) because the layers above check operator input and settings with the
same rules, and a command that only reads a database should not pay for
building every message class to do so.
"""

from __future__ import annotations

import re

#: The largest msgpack header a frame may carry.
MAX_HEADER = 1024 * 1024
#: The largest raw payload a frame may carry.
MAX_PAYLOAD = 16 * 1024 * 1024

_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_PACKAGE_RE = re.compile(r"[A-Za-z0-9._-]{1,64}-[A-Za-z0-9._-]{1,64}")
_GROUP_RE = re.compile(r"group:[A-Za-z0-9._-]{1,64}")


def is_safe_name(value: str) -> bool:
    """Node names and job ids: the documented pattern, minus dot-only names."""
    return _NAME_RE.fullmatch(value) is not None and value.strip(".") != ""


def is_package_id(value: str) -> bool:
    """Package ids are ``NAME-VERSION``; neither part may be dots only."""
    if _PACKAGE_RE.fullmatch(value) is None or value.strip(".") == "":
        return False
    return all(part.strip(".") != "" for part in value.split("-"))


def is_destination(value: str) -> bool:
    """A job destination: a node name or ``group:NAME``."""
    if value.startswith("group:"):
        return _GROUP_RE.fullmatch(value) is not None and is_safe_name(value[6:])
    return is_safe_name(value)
