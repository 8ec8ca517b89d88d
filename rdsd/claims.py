"""Self-signed claims: what a node says about itself, signed with its own key.

Every node holds an EC P-256 key, the key of the certificate the server
issued it at enrolment. Two things a node says are claims signed with that
key, so the server can check them against the public key it recorded when
it issued the certificate, however many relays carried them:

- **attach**: "node N (role) is attached under parent P", with the time and a
  counter that only grows at N. A child puts it in its HELLO; relays keep
  their children's newest claim and forward it unchanged in TOPOLOGY and
  PRESENCE. A route to N is believed only on N's own claim.
- **report**: a REPORT's fields, signed by its ``origin``. Relays forward
  the report and its ``sig`` unchanged.

Each kind is signed over its own canonical encoding, whose first element
is a tag naming the kind (``ATTACH_TAG``, ``REPORT_TAG``), so a signature
made for one kind never verifies as another. ECDSA with SHA-256; the
signature is DER. ``protocol/SPEC.md`` (section 9a) is the wire description.

A relay can therefore delay or drop what it carries, never forge it.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from protocol import Report, is_safe_name

from .domain import Role
from .errors import SecurityError

ATTACH_TAG = "rdsd-attach/1"
REPORT_TAG = "rdsd-report/1"
_ECDSA = ec.ECDSA(hashes.SHA256())


class ClaimError(SecurityError):
    """A claim that is malformed, unsigned, or not signed by who it names."""


@dataclass(frozen=True, slots=True)
class Attach:
    """A decoded attach claim; ``raw`` is the signed form that travels."""

    node: str
    role: Role
    parent: str
    counter: int
    time: float
    raw: bytes


def public_key_der(cert: bytes) -> bytes:
    """The SubjectPublicKeyInfo (DER) of a certificate, PEM or DER: what the
    server records at enrolment and checks claims against."""
    try:
        loaded = (
            x509.load_pem_x509_certificate(cert)
            if cert.lstrip().startswith(b"-----")
            else x509.load_der_x509_certificate(cert)
        )
    except ValueError as exc:
        raise SecurityError(f"certificate cannot be parsed: {exc}") from exc
    return loaded.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _load_public(der: bytes) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, TypeError) as exc:
        raise ClaimError(f"recorded public key cannot be loaded: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ClaimError("recorded public key is not an EC key")
    return key


#: Public keys kept loaded. A server checks every report against its
#: origin's key, and a fleet's reports come from every node in turn: with
#: fewer keys than nodes each report parsed its key again (with 4,096 kept
#: and 10,000 clients, most did). A loaded P-256 key costs about 2 KiB, so
#: this is at most 32 MiB, and only on a server of that many nodes.
KEYS_KEPT = 16384


class Keys:
    """Loaded public keys by their DER form, at most ``size`` of them: a
    report costs one signature check, not a key parse too."""

    def __init__(self, size: int = KEYS_KEPT) -> None:
        self._keys: OrderedDict[bytes, ec.EllipticCurvePublicKey] = OrderedDict()
        self._size = size

    def get(self, der: bytes, keep: bool = True) -> ec.EllipticCurvePublicKey:
        """The loaded key; kept for next time unless ``keep`` is false. An
        attach claim is checked once per connection, and a loaded key costs
        about 2 KiB (OpenSSL's, outside Python's heap) against 5 us to parse
        again, while the signature check itself is about 50 us: keeping the
        key of every child that connects cost a relay 2.3 KiB per idle
        child. Reports, which come again and again, keep theirs."""
        key = self._keys.get(der)
        if key is None:
            key = _load_public(der)
            if keep:
                self._keys[der] = key
                if len(self._keys) > self._size:
                    self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(der)
        return key


def _verify(key: ec.EllipticCurvePublicKey, sig: bytes, body: bytes, what: str) -> None:
    try:
        key.verify(sig, body, _ECDSA)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise ClaimError(f"{what} is not signed by its node's enrolled key") from exc


# -- attach claims ---------------------------------------------------------------------


def attach_body(node: str, role: str, parent: str, counter: int, time: float) -> bytes:
    """The canonical bytes an attach claim signs."""
    return bytes(
        msgpack.packb(
            [ATTACH_TAG, node, str(role), parent, counter, float(time)], use_bin_type=True
        )
    )


def decode_attach(raw: bytes) -> Attach:
    """An attach claim's content, checked for shape but not for its
    signature (a relay that does not hold the signer's key can still see
    what the claim says). Raises ClaimError."""
    try:
        outer = msgpack.unpackb(raw, raw=False, use_list=True, strict_map_key=True)
        body, sig = outer
        fields = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True)
        tag, node, role, parent, counter, time = fields
    except Exception as exc:  # msgpack raises several types on bad input
        raise ClaimError(f"attach claim is malformed: {type(exc).__name__}") from None
    if not (isinstance(body, bytes) and isinstance(sig, bytes)) or tag != ATTACH_TAG:
        raise ClaimError("not an attach claim")
    if not (isinstance(node, str) and is_safe_name(node)):
        raise ClaimError("attach claim names no valid node")
    if not (isinstance(parent, str) and is_safe_name(parent)):
        raise ClaimError("attach claim names no valid parent")
    if role not in (Role.RELAY, Role.CLIENT):
        raise ClaimError("attach claim role is not relay or client")
    if isinstance(counter, bool) or not isinstance(counter, int) or not 0 <= counter < 2**63:
        raise ClaimError("attach claim counter is out of range")
    if not isinstance(time, float) or not math.isfinite(time):
        raise ClaimError("attach claim time is not a finite float")
    return Attach(node, Role(role), parent, counter, time, raw)


def verify_attach(raw: bytes, key: ec.EllipticCurvePublicKey) -> Attach:
    """``decode_attach``, and the signature checked against ``key``."""
    claim = decode_attach(raw)
    body, sig = msgpack.unpackb(raw, raw=False)
    _verify(key, sig, body, f"attach claim of {claim.node}")
    return claim


# -- report claims ---------------------------------------------------------------------


def report_body(rep: Report) -> bytes:
    """The canonical bytes a report's ``sig`` signs: every field but
    ``sig``, in a fixed order, ``time`` as a 64-bit float."""
    fields: list[Any] = [
        REPORT_TAG,
        rep.report_id,
        rep.job,
        rep.node,
        rep.state,
        rep.seq,
        rep.detail,
        rep.package,
        float(rep.time),
        rep.origin,
    ]
    try:
        return bytes(msgpack.packb(fields, use_bin_type=True))
    except (OverflowError, ValueError, TypeError) as exc:
        raise ClaimError(f"report cannot be encoded for its signature: {exc}") from None


def verify_report(rep: Report, key: ec.EllipticCurvePublicKey) -> None:
    """Return only if ``rep.sig`` is a signature over ``report_body(rep)``
    by ``key``."""
    if not rep.sig:
        raise ClaimError("report is not signed")
    _verify(key, rep.sig, report_body(rep), f"report {rep.report_id}")


class ClaimSigner:
    """Signs this node's own claims with its certificate's key."""

    def __init__(self, key_pem: bytes) -> None:
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise SecurityError(f"cannot load this node's key: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise SecurityError("this node's key is not an EC key")
        self._key = key

    @classmethod
    def from_file(cls, path: Path) -> ClaimSigner:
        try:
            return cls(path.read_bytes())
        except OSError as exc:
            raise SecurityError(f"cannot read this node's key {path}: {exc}") from exc

    def public_der(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def attach(self, node: str, role: str, parent: str, counter: int, time: float) -> bytes:
        """A signed attach claim: msgpack ``[body, signature]``."""
        body = attach_body(node, role, parent, counter, time)
        return bytes(msgpack.packb([body, self._key.sign(body, _ECDSA)], use_bin_type=True))

    def report(self, rep: Report) -> Report:
        """``rep`` with ``sig`` set."""
        return dataclasses.replace(rep, sig=self._key.sign(report_body(rep), _ECDSA))


__all__ = [
    "ATTACH_TAG",
    "KEYS_KEPT",
    "REPORT_TAG",
    "Attach",
    "ClaimError",
    "ClaimSigner",
    "Keys",
    "attach_body",
    "decode_attach",
    "public_key_der",
    "report_body",
    "verify_attach",
    "verify_report",
]
