"""Protocol errors, split by who broke the rules.

Following h11, a ``LocalProtocolError`` means *our* code tried to do something
the protocol forbids (a bug on this side), while a ``RemoteProtocolError``
means the peer sent something we cannot accept. The adapter answers the
second kind with an ERROR message and closes; the first kind should surface
as a crash in tests.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Codes carried in ERROR messages so the peer can tell what went wrong."""

    PROTOCOL = 1  # malformed frame or message, message out of state
    FRAME_TOO_LARGE = 2
    UNSUPPORTED_VERSION = 3
    UNAUTHORIZED = 4  # identity or permission check failed
    REVOKED = 5
    INTERNAL = 6
    SHUTDOWN = 7
    TIMEOUT = 8


class ProtocolError(Exception):
    """Base of every protocol violation."""

    def __init__(self, msg: str, code: ErrorCode = ErrorCode.PROTOCOL) -> None:
        super().__init__(msg)
        self.code = code


class LocalProtocolError(ProtocolError):
    """This side tried to send something the protocol does not allow now."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes or a message this side cannot accept."""
