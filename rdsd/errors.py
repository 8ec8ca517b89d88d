"""Every exception rdsd raises above the wire, under one root.

Catch ``RdsdError`` to catch anything rdsd means to tell you; ``UserError``
is the branch for requests a person made that cannot be done as asked (the
command line prints those as one line and exits 1). Wire-level violations
are ``protocol.ProtocolError``: the wire layer stays independent of this
package, so those are caught and turned into closed sessions at the edge.
"""

from __future__ import annotations


class RdsdError(Exception):
    """The root of every rdsd error."""


class UserError(RdsdError):
    """A request that cannot be done as asked; the message says why, for a person."""


class ConfigError(UserError):
    """A home directory, a setting or a command-line value is not usable; says which."""


class AdminError(UserError):
    """An admin operation was refused; the message names what and why."""


class JobError(UserError):
    """A job cannot be created or changed as asked."""


class SecurityError(RdsdError):
    """A certificate, key, bundle or signature is not acceptable."""


class PackingError(RdsdError):
    """A source directory or archive cannot be packed or extracted safely;
    the message names the member and why."""


class ManifestError(RdsdError):
    """A manifest or envelope is malformed, unsigned or badly signed."""


class StoreError(RdsdError):
    """A store operation failed; the message is meant for an operator."""


class CorruptChunk(StoreError):
    """A chunk on disk or on the wire does not match its signed digest."""

    def __init__(self, package: str, offset: int, where: str) -> None:
        super().__init__(f"{package}: chunk at offset {offset} does not match its digest ({where})")
        self.package = package
        self.offset = offset


class DiskFull(StoreError):
    """ENOSPC/EFBIG/EDQUOT while writing: the download is dropped, the store intact."""


class ExpiredPackage(StoreError):
    """The package's keep time is over by this node's clock: it is neither
    served nor stored again."""


class TransferFailed(RdsdError):
    """One attempt to receive a package failed; ``retryable`` says whether
    trying again may help (a cut link) or not (refused, disk full)."""

    def __init__(self, reason: str, retryable: bool = True) -> None:
        super().__init__(reason)
        self.retryable = retryable


class TransferPaused(RdsdError):
    """A transfer stopped between chunks because its window closed; it goes
    on from its verified offset when the window opens. Not a failure: it
    uses up no attempt."""


class WindowClosed(RdsdError):
    """Work is outside its window and this process does not wait for it
    (``rdsft -a`` leaves it to the daemon); the message says until when."""


class LaneRefused(RdsdError):
    """A lane (a connection of its own for one fetch) could not be opened:
    the parent is unreachable on it, does not take lanes, or refused this
    one before any package byte moved. The fetch goes over the session."""


class SessionClosed(RdsdError):
    """A session ended (peer closed, error, or timeout); says why."""


class PeerError(SessionClosed):
    """The peer hung up with an ERROR message (refused, revoked, ...)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"peer refused: {reason}")
        self.code = code
        self.reason = reason


class IllegalTransition(RdsdError):
    """A destination state change the lifecycle table does not allow."""
