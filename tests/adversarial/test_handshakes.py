"""Failed TLS handshakes are logged with the peer's address and the reason,
rate-limited, and summed up.

Five kinds of failure against a real server daemon, each from its own
loopback address (127.0.0.2 and up: the log is limited per address): no
certificate, a certificate of another deployment's CA, an expired
certificate of this CA, TLS 1.2, and plaintext. Each is one
``child.tls_failed`` line naming the address and why; a second failure from
the same address within the interval is held back and counted in the
``child.tls_failed_summary`` line; an honest child is served throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from rdsd.admin import init_server
from rdsd.config import HomePaths
from rdsd.domain import Role
from rdsd.security import client_context
from tests.helpers import Deployment, wait_until

from .daemons import Daemon, Honest, configure, daemon


def expired_certificate(deployment: Deployment, home: Path) -> tuple[Path, Path]:
    """A copy of ``home``'s certificate, signed by the same CA, that
    expired yesterday; its key is the node's own."""
    paths, ca = HomePaths(home), deployment.server.paths
    cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
    ca_cert = x509.load_pem_x509_certificate(ca.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.ca_key.read_bytes(), None)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(ca_cert.subject)
        .public_key(cert.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=30))
        .not_valid_after(now - datetime.timedelta(days=1))
    )
    for ext in cert.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    expired = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    out = home.parent / "expired.pem"
    out.write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    return out, paths.key


async def attempt(d: Daemon, source: str, ctx: ssl.SSLContext | None) -> None:
    """One connection from ``source`` that the server refuses."""
    with contextlib.suppress(OSError, ssl.SSLError, EOFError, TimeoutError):
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection(
                *d.address, ssl=ctx, local_addr=(source, 0)
            )
            writer.write(b"GET / HTTP/1.0\r\n\r\n" if ctx is None else b"RDS\x01")
            await reader.read(100)
            writer.close()


async def test_handshake_failures_are_logged_by_address_and_reason(
    deployment: Deployment,
) -> None:
    cfg = configure(deployment.server)
    foreign = deployment.root / "foreign"
    init_server(foreign, name="foreign", listen=("127.0.0.1", 0))
    with daemon(cfg) as d:
        honest = await Honest.connect(deployment, d)
        mallory = deployment.add_node("mallory", Role.CLIENT, d.address)
        ca = deployment.server.paths.ca_cert
        no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        no_cert.check_hostname = False
        no_cert.load_verify_locations(ca)
        theirs = HomePaths(foreign)
        other_ca = client_context(ca, theirs.cert, theirs.key)
        expired = client_context(ca, *expired_certificate(deployment, mallory.home))
        old_tls = client_context(ca, mallory.paths.cert, mallory.paths.key)
        old_tls.minimum_version = ssl.TLSVersion.TLSv1_2
        old_tls.maximum_version = ssl.TLSVersion.TLSv1_2
        kinds = {
            "127.0.0.2": no_cert,
            "127.0.0.3": other_ca,
            "127.0.0.4": expired,
            "127.0.0.5": old_tls,
            "127.0.0.6": None,
        }
        for source, ctx in kinds.items():
            await attempt(d, source, ctx)
            await honest.ping()
        await attempt(d, "127.0.0.6", None)  # again within the interval: held back
        await wait_until(lambda: len(d.events("child.tls_failed")) >= 5, 10, what="5 lines")
        await asyncio.sleep(0.5)
        await honest.ping()
        await honest.close()
        lines = {e["peer_address"].rsplit(":", 1)[0]: e for e in d.events("child.tls_failed")}
    assert sorted(lines) == sorted(kinds), lines
    reasons = {source: line["reason"].lower() for source, line in lines.items()}
    assert "certificate" in reasons["127.0.0.2"], reasons
    assert "unable to get local issuer certificate" in reasons["127.0.0.3"], reasons
    assert "expired" in reasons["127.0.0.4"], reasons
    assert "version" in reasons["127.0.0.5"] or "protocol" in reasons["127.0.0.5"], reasons
    assert "http" in reasons["127.0.0.6"] or "version" in reasons["127.0.0.6"], reasons
    assert len(d.events("child.tls_failed")) == 5
    # The held-back one is counted in the summary (written at the latest
    # when the daemon stops).
    summary = d.events("child.tls_failed_summary")
    assert len(summary) == 1 and summary[0]["unlogged"] == 1 and summary[0]["hosts"] == 1
