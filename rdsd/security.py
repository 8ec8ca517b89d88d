"""Certificates, TLS contexts, package signatures and enrolment bundles.

Each deployment is its own small PKI: one CA made at ``rdsd init server``
signs a certificate per node, and every TLS context trusts that CA alone, so
a certificate from any public CA (or from another rdsd deployment) opens no
door. A node's identity is taken from the certificate its peer proved it
holds the key for, never from a name sent in a message: a relay cannot
claim to be the server, nor a client another client.

Package manifests are signed with a separate Ed25519 key that never leaves
the server. TLS only says who we talk to; the signature says what the
server vouched for, so a relay can forward packages but never forge one.

Everything here is pure functions and immutable values: no module-level
mutable state, so the server, relays and tests in one process cannot
interfere through this module.
"""

from __future__ import annotations

import datetime
import json
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol import is_safe_name

from .errors import SecurityError
from .util.fsutil import atomic_write

__all__ = [
    "BUNDLE_FORMAT",
    "ROLES",
    "Bundle",
    "SecurityError",
    "Signer",
    "Verifier",
    "client_context",
    "create_ca",
    "generate_signing_key",
    "issue_certificate",
    "peer_identity",
    "read_bundle",
    "server_context",
    "write_bundle",
]


ROLES = ("server", "relay", "client")

#: Roles a bundle may be issued for: the server makes its own credentials at
#: init and is never enrolled, so a "server" bundle can only be a forgery or
#: a mistake.
BUNDLE_ROLES = ("relay", "client")

BUNDLE_FORMAT = "rdsd-bundle/1"

CA_VALIDITY = datetime.timedelta(days=20 * 365)

#: Nodes' clocks are not perfectly in sync; a certificate that becomes valid
#: "now" on the server would be rejected for a few minutes by a child whose
#: clock runs behind.
CLOCK_SKEW = datetime.timedelta(minutes=5)

#: RFC 5280 upper bound for a common name, enforced by ``cryptography``.
_CN_MAX_BYTES = 64


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_ec_key() -> ec.EllipticCurvePrivateKey:
    # P-256 rather than RSA: small keys and fast handshakes for thousands of
    # clients, and supported by every TLS 1.3 stack.
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted on purpose: the daemon starts unattended. The files are
    # protected by their 0600 mode instead.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _fit_cn(text: str) -> str:
    """Cut ``text`` to the common-name limit (UTF-8 bytes, whole characters).

    The CA's CN is informational only (trust is by key, and each context
    loads one CA), so cutting a long deployment name is better than refusing
    to create the deployment.
    """
    return text.encode("utf-8")[:_CN_MAX_BYTES].decode("utf-8", errors="ignore")


def create_ca(deployment: str) -> tuple[bytes, bytes]:
    """New self-signed CA for one deployment: ``(ca_cert_pem, ca_key_pem)``.

    ``path_length=0`` means this CA can sign node certificates but no
    intermediate CA, so a stolen node key can never mint other identities.
    The validity is long (20 years) because re-keying every node of a large
    deployment is far costlier than the risk it removes; revocation covers
    single nodes. The CN is ``rdsd CA <deployment>``, cut to 64 bytes if the
    deployment name is very long.
    """
    key = _new_ec_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _fit_cn(f"rdsd CA {deployment}"))])
    now = _now()
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        # Key identifiers let OpenSSL's strict mode (and other stacks) link
        # node certificates to this CA by key, not only by name.
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _cert_pem(cert), _key_pem(key)


def _check_name_role(name: str, role: str, roles: tuple[str, ...] = ROLES) -> None:
    # Names end up in paths, logs and job destinations: refuse anything that
    # could escape a directory or confuse a parser before it gets that far.
    if not isinstance(name, str) or not is_safe_name(name):
        raise SecurityError(f"unsafe node name {name!r}")
    if role not in roles:
        raise SecurityError(f"role {role!r} is not one of {', '.join(roles)}")


def _load_ca(
    ca_cert_pem: bytes, ca_key_pem: bytes
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
        ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise SecurityError(f"cannot load the CA certificate or key: {exc}") from exc
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise SecurityError("the CA key is not an ECDSA key")
    if _public_der(ca_key.public_key()) != _public_der(ca_cert.public_key()):
        raise SecurityError("the CA key does not belong to the CA certificate")
    return ca_cert, ca_key


def _public_der(key: CertificatePublicKeyTypes) -> bytes:
    """Canonical encoding of a public key, to tell whether two halves match."""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def issue_certificate(
    ca_cert_pem: bytes, ca_key_pem: bytes, name: str, role: str, days: int = 3650
) -> tuple[bytes, bytes, int]:
    """Certificate for one node: ``(cert_pem, key_pem, serial)``.

    The role lives in the certificate (OU) so that a parent can decide what
    a peer may do from what the CA signed, not from what the peer says. The
    name is also a ``rdsd://node/NAME`` URI SAN: node names need not be DNS
    names, and putting them in a dNSName would invite hostname-matching
    surprises. The random serial is what revocation lists refer to.
    """
    _check_name_role(name, role)
    if days < 1:
        raise SecurityError(f"certificate validity must be at least one day, not {days}")
    ca_cert, ca_key = _load_ca(ca_cert_pem, ca_key_pem)
    key = _new_ec_key()
    public = key.public_key()
    serial = x509.random_serial_number()
    now = _now()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(serial)
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        # Both purposes: a relay is a TLS client to its parent and a TLS
        # server to its children with the one certificate.
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"rdsd://node/{name}")]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return _cert_pem(cert), _key_pem(key), serial


def _single_attribute(cert: x509.Certificate, oid: x509.ObjectIdentifier, what: str) -> str:
    # Exactly one: with two CNs, different code could pick different ones
    # and disagree about who the peer is.
    attrs = cert.subject.get_attributes_for_oid(oid)
    if len(attrs) != 1:
        raise SecurityError(f"certificate has {len(attrs)} {what} attributes, expected 1")
    value = attrs[0].value
    if not isinstance(value, str):
        raise SecurityError(f"certificate {what} is not text")
    return value


def _identity(cert: x509.Certificate) -> tuple[str, str]:
    name = _single_attribute(cert, NameOID.COMMON_NAME, "CN")
    role = _single_attribute(cert, NameOID.ORGANIZATIONAL_UNIT_NAME, "OU")
    _check_name_role(name, role)
    return name, role


def peer_identity(der: bytes | None) -> tuple[str, str, int]:
    """``(name, role, serial)`` of a TLS peer, from its DER certificate.

    Call this only on a certificate that the TLS handshake verified against
    our CA (``getpeercert(binary_form=True)``): this function trusts the
    chain and only decides *who* the peer is. That answer is final for the
    whole session; names inside messages are checked against it, never
    used instead of it.
    """
    if not der:
        raise SecurityError("peer presented no certificate")
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise SecurityError(f"peer certificate cannot be parsed: {exc}") from exc
    name, role = _identity(cert)
    return name, role, cert.serial_number


def certificate_identity(pem: bytes) -> tuple[str, str, int]:
    """``(name, role, serial)`` of one of our own PEM certificates, so a node
    can check at start that its configuration and its certificate agree."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise SecurityError(f"certificate cannot be parsed: {exc}") from exc
    name, role = _identity(cert)
    return name, role, cert.serial_number


def _tls_context(protocol: int, ca_pem: Path, cert_pem: Path, key_pem: Path) -> ssl.SSLContext:
    """Shared TLS 1.3 mutual-auth settings for both directions.

    TLS 1.3 only: no downgrade, no legacy cipher negotiation to get wrong.
    Only our CA is trusted; the system store is never loaded, because a
    certificate from a public CA must not make anyone a node.
    """
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cafile=str(ca_pem))
        ctx.load_cert_chain(certfile=str(cert_pem), keyfile=str(key_pem))
    except OSError as exc:  # includes ssl.SSLError: wrong key, bad PEM
        raise SecurityError(
            f"cannot load TLS credentials (ca {ca_pem}, cert {cert_pem}, key {key_pem}): {exc}"
        ) from exc
    return ctx


def server_context(ca_pem: Path, cert_pem: Path, key_pem: Path) -> ssl.SSLContext:
    """TLS context for accepting children: they must present a certificate
    from our CA (``CERT_REQUIRED``), or the handshake fails before any
    message is read."""
    return _tls_context(ssl.PROTOCOL_TLS_SERVER, ca_pem, cert_pem, key_pem)


def client_context(ca_pem: Path, cert_pem: Path, key_pem: Path) -> ssl.SSLContext:
    """TLS context for connecting to a parent.

    Hostname checking is off because parents are addressed by IP or by
    whatever name the operator configured, which need not appear in the
    certificate. That is safe because the chain is still verified against
    our CA alone, and the caller checks the parent's name and role with
    :func:`peer_identity`.
    """
    ctx = _tls_context(ssl.PROTOCOL_TLS_CLIENT, ca_pem, cert_pem, key_pem)
    # Clearing check_hostname leaves verify_mode at CERT_REQUIRED: the chain
    # is still verified, only the name match is skipped.
    ctx.check_hostname = False
    return ctx


def generate_signing_key() -> tuple[bytes, bytes]:
    """Ed25519 package-signing key: ``(private_pem, public_pem)``.

    Ed25519 because signatures are deterministic (no nonce to get wrong)
    and small, and verification is cheap on every client. The public half
    travels in enrolment bundles; the private half stays on the server.
    """
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


class Signer:
    """Signs manifests on the server.

    Loads the key once so that re-signing many manifests (e.g. after a
    keep-duration change) does not re-parse the PEM each time.
    """

    def __init__(self, private_pem: bytes) -> None:
        try:
            key = serialization.load_pem_private_key(private_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise SecurityError(f"cannot load the package-signing key: {exc}") from exc
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise SecurityError("the package-signing key is not an Ed25519 key")
        self._key = key

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


class Verifier:
    """Checks the server's signature on manifests, on relays and clients.

    Refuses any key type but Ed25519 at construction, so a swapped key file
    fails loudly at start-up rather than on the first package.
    """

    def __init__(self, public_pem: bytes) -> None:
        try:
            key = serialization.load_pem_public_key(public_pem)
        except (ValueError, TypeError) as exc:
            raise SecurityError(f"cannot load the package-signing public key: {exc}") from exc
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise SecurityError("the package-signing public key is not an Ed25519 key")
        self._key = key

    def verify(self, data: bytes, signature: bytes) -> None:
        """Return only if ``signature`` is the server's over ``data``.

        Raises rather than returning a bool so that a forgotten check
        cannot silently pass.
        """
        try:
            self._key.verify(signature, data)
        except (InvalidSignature, ValueError, TypeError) as exc:
            raise SecurityError(
                "bad signature: not made by this deployment's package-signing key"
            ) from exc


@dataclass(frozen=True)
class Bundle:
    """Everything a new node needs to join: trust anchor, identity, and the
    key that tells it which packages the server vouches for.

    ``key_pem`` is kept out of ``repr`` so a logged bundle leaks no key.
    """

    name: str
    role: str
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    signing_pub_pem: bytes


def write_bundle(path: Path, bundle: Bundle) -> None:
    """Write ``bundle`` as JSON, atomically and readable by the owner only.

    Atomic so an interrupted ``rdsd enroll`` never leaves a truncated bundle
    that fails confusingly at ``rdsd init``; mode 0600 because it holds the
    node's private key.
    """
    doc = {
        "format": BUNDLE_FORMAT,
        "name": bundle.name,
        "role": bundle.role,
        "ca": bundle.ca_pem.decode("ascii"),
        "cert": bundle.cert_pem.decode("ascii"),
        "key": bundle.key_pem.decode("ascii"),
        "signing_pub": bundle.signing_pub_pem.decode("ascii"),
    }
    data = (json.dumps(doc, indent=2) + "\n").encode("utf-8")
    atomic_write(path, data, mode=0o600)


def _text_field(doc: dict[str, object], key: str, where: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str):
        raise SecurityError(f"{where}: field {key!r} is missing or not a string")
    return value


def read_bundle(path: Path) -> Bundle:
    """Load a bundle and check it is internally consistent before use.

    A bundle is carried by hand or by script between machines; checking it
    here turns a wrong, mixed-up or tampered file into one clear error at
    ``rdsd init`` instead of a puzzling TLS failure later. This checks
    consistency, not authenticity against the deployment: the node has no
    prior trust anchor, so the bundled CA becomes its anchor.
    """
    where = f"bundle {path}"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SecurityError(f"{where}: cannot read: {exc.strerror or exc}") from exc
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SecurityError(f"{where}: not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise SecurityError(f"{where}: not a JSON object")
    fmt = doc.get("format")
    if fmt != BUNDLE_FORMAT:
        raise SecurityError(f"{where}: unknown format {fmt!r}, expected {BUNDLE_FORMAT!r}")
    name = _text_field(doc, "name", where)
    role = _text_field(doc, "role", where)
    try:
        _check_name_role(name, role, BUNDLE_ROLES)
    except SecurityError as exc:
        raise SecurityError(f"{where}: {exc}") from None
    pems = {
        key: _text_field(doc, key, where).encode("utf-8")
        for key in ("ca", "cert", "key", "signing_pub")
    }

    try:
        ca_cert = x509.load_pem_x509_certificate(pems["ca"])
    except ValueError as exc:
        raise SecurityError(f"{where}: CA certificate cannot be parsed: {exc}") from exc
    try:
        cert = x509.load_pem_x509_certificate(pems["cert"])
    except ValueError as exc:
        raise SecurityError(f"{where}: node certificate cannot be parsed: {exc}") from exc
    try:
        constraints = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError):
        constraints = None
    if constraints is None or not constraints.ca:
        raise SecurityError(f"{where}: the bundled CA certificate is not a CA")
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise SecurityError(f"{where}: certificate was not issued by the bundled CA") from exc
    try:
        cert_name, cert_role = _identity(cert)
    except SecurityError as exc:
        raise SecurityError(f"{where}: {exc}") from None
    if cert_name != name:
        raise SecurityError(
            f"{where}: certificate is not for node {name!r} (it is for {cert_name!r})"
        )
    if cert_role != role:
        raise SecurityError(f"{where}: certificate is for role {cert_role!r}, not {role!r}")
    if cert.not_valid_after_utc <= _now():
        raise SecurityError(f"{where}: certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}")

    try:
        key = serialization.load_pem_private_key(pems["key"], password=None)
    except (ValueError, TypeError) as exc:
        raise SecurityError(f"{where}: private key cannot be loaded: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or _public_der(
        key.public_key()
    ) != _public_der(cert.public_key()):
        raise SecurityError(f"{where}: private key does not match the certificate")

    try:
        Verifier(pems["signing_pub"])
    except SecurityError as exc:
        raise SecurityError(f"{where}: {exc}") from None

    return Bundle(
        name=name,
        role=role,
        ca_pem=pems["ca"],
        cert_pem=pems["cert"],
        key_pem=pems["key"],
        signing_pub_pem=pems["signing_pub"],
    )
