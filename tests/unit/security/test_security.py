"""Tests for rdsd.security: the deployment PKI, bundles, signatures and a
real mutual TLS 1.3 handshake over loopback (no mocks)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import stat
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from rdsd.security import (
    ROLES,
    Bundle,
    SecurityError,
    Signer,
    Verifier,
    client_context,
    create_ca,
    generate_signing_key,
    issue_certificate,
    peer_identity,
    read_bundle,
    server_context,
    write_bundle,
)

UNSAFE_NAMES = ["..", ".", "a/b", "x\x00", "", "a b", "x" * 65, "../etc"]


def der_of(cert_pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(cert_pem).public_bytes(Encoding.DER)


@pytest.fixture(scope="module")
def ca() -> tuple[bytes, bytes]:
    return create_ca("test")


@pytest.fixture(scope="module")
def other_ca() -> tuple[bytes, bytes]:
    return create_ca("other")


# --- CA and certificates ---------------------------------------------------------------


def test_ca_properties(ca: tuple[bytes, bytes]) -> None:
    cert = x509.load_pem_x509_certificate(ca[0])
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "rdsd CA test"
    assert cert.issuer == cert.subject
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert life.days >= 20 * 365
    cert.verify_directly_issued_by(cert)  # self-signed
    assert b"PRIVATE KEY" in ca[1]


def test_ca_long_deployment_name_still_works() -> None:
    cert_pem, _ = create_ca("d" * 64)
    cn = x509.load_pem_x509_certificate(cert_pem).subject.rfc4514_string()
    assert cn.startswith("CN=rdsd CA ddd")


def test_issue_certificate_round_trip(ca: tuple[bytes, bytes]) -> None:
    cert_pem, key_pem, serial = issue_certificate(ca[0], ca[1], "relay-1.example", "relay")
    cert = x509.load_pem_x509_certificate(cert_pem)
    ca_cert = x509.load_pem_x509_certificate(ca[0])
    cert.verify_directly_issued_by(ca_cert)
    assert cert.serial_number == serial
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "relay-1.example"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "relay"
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "rdsd://node/relay-1.example"
    ]
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days >= 3650
    assert b"PRIVATE KEY" in key_pem
    # Serials are random: two certificates for the same node differ.
    assert issue_certificate(ca[0], ca[1], "relay-1.example", "relay")[2] != serial


def test_peer_identity_of_issued_certificate(ca: tuple[bytes, bytes]) -> None:
    for role in ROLES:
        cert_pem, _, serial = issue_certificate(ca[0], ca[1], f"node-{role}", role, days=1)
        assert peer_identity(der_of(cert_pem)) == (f"node-{role}", role, serial)


@pytest.mark.parametrize("der", [None, b"", b"not a certificate"])
def test_peer_identity_refuses_missing_or_garbage(der: bytes | None) -> None:
    with pytest.raises(SecurityError):
        peer_identity(der)


def test_peer_identity_refuses_ca_certificate(ca: tuple[bytes, bytes]) -> None:
    # The CA certificate has a CN but no OU: it is not a node.
    with pytest.raises(SecurityError, match="OU"):
        peer_identity(der_of(ca[0]))


@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_unsafe_names_refused(ca: tuple[bytes, bytes], name: str) -> None:
    with pytest.raises(SecurityError, match="unsafe node name"):
        issue_certificate(ca[0], ca[1], name, "client")


@pytest.mark.parametrize("role", ["admin", "", "Server", "root"])
def test_bad_roles_refused(ca: tuple[bytes, bytes], role: str) -> None:
    with pytest.raises(SecurityError, match="role"):
        issue_certificate(ca[0], ca[1], "node", role)


def test_issue_refuses_mismatched_ca_key(
    ca: tuple[bytes, bytes], other_ca: tuple[bytes, bytes]
) -> None:
    with pytest.raises(SecurityError, match="CA key"):
        issue_certificate(ca[0], other_ca[1], "node", "client")


# --- bundles ---------------------------------------------------------------------------


def make_bundle(ca: tuple[bytes, bytes], name: str = "c1", role: str = "client") -> Bundle:
    cert, key, _ = issue_certificate(ca[0], ca[1], name, role)
    _, pub = generate_signing_key()
    return Bundle(
        name=name, role=role, ca_pem=ca[0], cert_pem=cert, key_pem=key, signing_pub_pem=pub
    )


def test_bundle_round_trip(ca: tuple[bytes, bytes], tmp_path: Path) -> None:
    bundle = make_bundle(ca, "relay-7", "relay")
    path = tmp_path / "relay-7.bundle"
    write_bundle(path, bundle)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert doc["format"] == "rdsd-bundle/1"
    assert set(doc) == {"format", "name", "role", "ca", "cert", "key", "signing_pub"}
    assert read_bundle(path) == bundle
    assert "PRIVATE" not in repr(bundle)
    # No temporary file is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["relay-7.bundle"]


def test_bundle_from_another_ca_refused(
    ca: tuple[bytes, bytes], other_ca: tuple[bytes, bytes], tmp_path: Path
) -> None:
    foreign = make_bundle(other_ca)
    path = tmp_path / "b"
    write_bundle(path, replace(make_bundle(ca), cert_pem=foreign.cert_pem, key_pem=foreign.key_pem))
    with pytest.raises(SecurityError, match="not issued by the bundled CA"):
        read_bundle(path)


def test_bundle_server_role_refused(ca: tuple[bytes, bytes], tmp_path: Path) -> None:
    path = tmp_path / "b"
    write_bundle(path, make_bundle(ca, "srv", "server"))
    with pytest.raises(SecurityError, match="role"):
        read_bundle(path)


def tamper(path: Path, **changes: object) -> None:
    doc = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            del doc[key]
        else:
            doc[key] = value
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format": "rdsd-bundle/2"}, "unknown format"),
        ({"name": "c2"}, "certificate is not for node 'c2'"),
        ({"name": "../c1"}, "unsafe node name"),
        ({"role": "relay"}, "certificate is for role 'client'"),
        ({"cert": None}, "'cert' is missing"),
        ({"key": 42}, "'key' is missing or not a string"),
        ({"ca": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}, "CA"),
        ({"signing_pub": "nope"}, "package-signing public key"),
    ],
)
def test_tampered_bundle_refused(
    ca: tuple[bytes, bytes], tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    path = tmp_path / "b"
    write_bundle(path, make_bundle(ca))
    tamper(path, **changes)
    with pytest.raises(SecurityError, match=message):
        read_bundle(path)


def test_bundle_with_foreign_key_refused(ca: tuple[bytes, bytes], tmp_path: Path) -> None:
    path = tmp_path / "b"
    other = make_bundle(ca, "c1")
    write_bundle(path, replace(make_bundle(ca, "c1"), key_pem=other.key_pem))
    with pytest.raises(SecurityError, match="private key does not match"):
        read_bundle(path)


def test_bundle_with_forged_certificate_refused(ca: tuple[bytes, bytes], tmp_path: Path) -> None:
    """A certificate edited to name another node fails the CA signature check."""
    path = tmp_path / "b"
    write_bundle(path, make_bundle(ca, "node-a"))
    doc = json.loads(path.read_text())
    der = der_of(doc["cert"].encode())
    assert der.count(b"node-a") == 2  # CN and SAN URI
    forged = x509.load_der_x509_certificate(der.replace(b"node-a", b"node-b"))
    doc["cert"] = forged.public_bytes(Encoding.PEM).decode()
    doc["name"] = "node-b"
    path.write_text(json.dumps(doc))
    with pytest.raises(SecurityError, match="not issued by the bundled CA"):
        read_bundle(path)


@pytest.mark.parametrize("content", [None, b"", b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_unreadable_or_bad_json_bundle_refused(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "b"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SecurityError, match=f"bundle {path}"):
        read_bundle(path)


# --- signatures ------------------------------------------------------------------------


def test_sign_and_verify() -> None:
    private, public = generate_signing_key()
    assert b"BEGIN PRIVATE KEY" in private and b"BEGIN PUBLIC KEY" in public
    data = b"manifest bytes"
    sig = Signer(private).sign(data)
    verifier = Verifier(public)
    verifier.verify(data, sig)
    with pytest.raises(SecurityError, match="bad signature"):
        verifier.verify(data + b"!", sig)
    with pytest.raises(SecurityError, match="bad signature"):
        verifier.verify(data, bytes([sig[0] ^ 1]) + sig[1:])
    with pytest.raises(SecurityError, match="bad signature"):
        verifier.verify(data, b"short")
    _, other_public = generate_signing_key()
    with pytest.raises(SecurityError, match="bad signature"):
        Verifier(other_public).verify(data, sig)


def test_verifier_refuses_non_ed25519_key(ca: tuple[bytes, bytes]) -> None:
    ec_pub = (
        x509.load_pem_x509_certificate(ca[0])
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(SecurityError, match="Ed25519"):
        Verifier(ec_pub)
    with pytest.raises(SecurityError):
        Verifier(b"garbage")
    with pytest.raises(SecurityError, match="Ed25519"):
        Signer(ca[1])


# --- TLS -------------------------------------------------------------------------------


@dataclass
class Creds:
    ca: Path
    cert: Path
    key: Path


def write_creds(dir_: Path, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> Creds:
    dir_.mkdir(parents=True)
    creds = Creds(dir_ / "ca.pem", dir_ / "cert.pem", dir_ / "key.pem")
    creds.ca.write_bytes(ca_pem)
    creds.cert.write_bytes(cert_pem)
    creds.key.write_bytes(key_pem)
    return creds


def node_creds(
    root: Path, ca: tuple[bytes, bytes], name: str, role: str, trust: bytes | None = None
) -> Creds:
    cert, key, _ = issue_certificate(ca[0], ca[1], name, role)
    return write_creds(root / name, trust if trust is not None else ca[0], cert, key)


def test_contexts_are_tls13_mutual_and_private(ca: tuple[bytes, bytes], tmp_path: Path) -> None:
    c = node_creds(tmp_path, ca, "n", "relay")
    for ctx in (server_context(c.ca, c.cert, c.key), client_context(c.ca, c.cert, c.key)):
        assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert not ctx.check_hostname
        # Only our CA: nothing from the system trust store.
        assert ctx.cert_store_stats()["x509_ca"] == 1
        assert len(ctx.get_ca_certs()) == 1


def test_context_with_mismatched_key_refused(ca: tuple[bytes, bytes], tmp_path: Path) -> None:
    a = node_creds(tmp_path, ca, "a", "client")
    b = node_creds(tmp_path, ca, "b", "client")
    with pytest.raises(SecurityError):
        client_context(a.ca, a.cert, b.key)
    with pytest.raises(SecurityError):
        server_context(a.ca, a.cert, tmp_path / "missing.pem")


class Server:
    """A loopback TLS server recording the peer identity of each accepted session."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.accepted: asyncio.Queue[tuple[tuple[str, str, int], str | None]] = asyncio.Queue()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        obj = writer.get_extra_info("ssl_object")
        assert isinstance(obj, ssl.SSLObject)
        await self.accepted.put((peer_identity(obj.getpeercert(binary_form=True)), obj.version()))
        writer.write(b"hello\n")
        with contextlib.suppress(OSError):
            await writer.drain()
            await reader.read()  # until the client closes
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0, ssl=self.ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def connect(
    port: int, ctx: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    # As rdsd's uplink does: the host doubles as server_hostname; with
    # check_hostname off it is only used for SNI (not sent for an IP).
    return await asyncio.open_connection("127.0.0.1", port, ssl=ctx)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def good_session(server: Server, client: Creds) -> None:
    """Connect ``client``, check both sides' view of the other, and close."""
    reader, writer = await connect(server.port, client_context(client.ca, client.cert, client.key))
    try:
        obj = writer.get_extra_info("ssl_object")
        assert isinstance(obj, ssl.SSLObject)
        assert obj.version() == "TLSv1.3"
        assert peer_identity(obj.getpeercert(binary_form=True))[:2] == ("relay-1", "relay")
        assert await reader.readline() == b"hello\n"
        (name, role, _), version = await server.accepted.get()
        assert version == "TLSv1.3"
        assert (name, role) == (client.cert.parent.name, "client")
    finally:
        await close(writer)


async def test_mutual_tls13_handshake(ca: tuple[bytes, bytes], tmp_path: Path) -> None:
    relay = node_creds(tmp_path, ca, "relay-1", "relay")
    client = node_creds(tmp_path, ca, "client-1", "client")
    async with asyncio.timeout(10):
        async with Server(server_context(relay.ca, relay.cert, relay.key)) as server:
            await good_session(server, client)


async def test_client_from_other_ca_refused(
    ca: tuple[bytes, bytes], other_ca: tuple[bytes, bytes], tmp_path: Path
) -> None:
    relay = node_creds(tmp_path, ca, "relay-1", "relay")
    good = node_creds(tmp_path, ca, "client-1", "client")
    # Trusts our CA (so it accepts the server) but holds a certificate from
    # another CA: only the server's check can stop it.
    rogue = node_creds(tmp_path, other_ca, "rogue", "client", trust=ca[0])
    # Entirely from another deployment: both sides refuse.
    stranger = node_creds(tmp_path, other_ca, "stranger", "client")
    async with asyncio.timeout(10):
        async with Server(server_context(relay.ca, relay.cert, relay.key)) as server:
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                # In TLS 1.3 the client finishes its handshake before the
                # server checks the client's certificate, so the refusal
                # shows as an alert or EOF on the first read.
                reader, writer = await connect(
                    server.port, client_context(rogue.ca, rogue.cert, rogue.key)
                )
                try:
                    assert await reader.read() == b""
                finally:
                    await close(writer)
            with pytest.raises(ssl.SSLCertVerificationError):
                await connect(server.port, client_context(stranger.ca, stranger.cert, stranger.key))
            assert server.accepted.empty()
            # The server is unharmed and still accepts a good client.
            await good_session(server, good)
            assert server.accepted.empty()


async def test_tls12_client_refused(ca: tuple[bytes, bytes], tmp_path: Path) -> None:
    relay = node_creds(tmp_path, ca, "relay-1", "relay")
    client = node_creds(tmp_path, ca, "client-1", "client")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(client.ca))
    ctx.load_cert_chain(str(client.cert), str(client.key))
    async with asyncio.timeout(10):
        async with Server(server_context(relay.ca, relay.cert, relay.key)) as server:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await connect(server.port, ctx)
            assert server.accepted.empty()
