"""Setting up homes: a new deployment (``init_server``), a bundle for a
node to join with (``enroll``), and a relay or client home made from its
bundle (``init_node``)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..claims import public_key_der
from ..config import HomePaths, NodeConfig
from ..domain import Role
from ..errors import AdminError, ConfigError
from ..security import (
    Bundle,
    create_ca,
    generate_signing_key,
    issue_certificate,
    read_bundle,
    write_bundle,
)
from ..state import JobDB
from ..util.fsutil import atomic_write
from ..util.parse import check_node_name
from .ops import Admin


def _fresh_home(home: Path) -> HomePaths:
    paths = HomePaths(home)
    if paths.is_home():
        raise AdminError(f"{home} is already an rdsd home")
    if home.exists() and not home.is_dir():
        raise AdminError(f"{home} exists and is not a directory")
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths.tls.mkdir(mode=0o700, exist_ok=True)
    return paths


def init_server(
    home: Path, name: str = "server", listen: tuple[str, int] = ("0.0.0.0", 7700)
) -> NodeConfig:
    """Make a deployment: its CA, the server's certificate, the signing key."""
    cfg = NodeConfig(home=home, role=Role.SERVER, name=name, listen=listen)
    paths = _fresh_home(home)
    ca_cert, ca_key = create_ca(name)
    cert, key, _ = issue_certificate(ca_cert, ca_key, name, Role.SERVER)
    sign_key, sign_pub = generate_signing_key()
    atomic_write(paths.ca_cert, ca_cert)
    atomic_write(paths.ca_key, ca_key, mode=0o600)
    atomic_write(paths.cert, cert)
    atomic_write(paths.key, key, mode=0o600)
    atomic_write(paths.signing_key, sign_key, mode=0o600)
    atomic_write(paths.signing_pub, sign_pub)
    JobDB(paths.db).close()
    cfg.save()
    return cfg


def enroll(server_home: Path, name: str, role: str, out: Path, force: bool = False) -> None:
    """Issue a bundle a relay or client is set up from, and record the node.

    Enrolling a name again under the same role re-issues its bundle (a lost
    bundle); under another role it is refused unless ``force``, since the
    node's jobs and routes assume its role. ``out`` is never overwritten
    unless ``force``: it may be another node's bundle. Nothing is written
    when the request is refused, and the bundle is removed again if the
    node cannot be recorded."""
    try:
        want = Role(role)
    except ValueError:
        want = None
    if want not in (Role.RELAY, Role.CLIENT):
        raise ConfigError(f"role {role!r} is not allowed: use relay or client")
    assert want is not None
    check_node_name(name)
    admin = Admin(server_home)
    try:
        admin.require_role(Role.SERVER)
        paths = admin.paths
        if name == admin.cfg.name:
            raise AdminError(f"{name} is the server's own name")
        row = admin.db.node(name)
        if row is not None and row.revoked:
            # Revocation is by name: reusing it would let the old certificate in again.
            raise AdminError(f"{name} was revoked; enrol the replacement under a new name")
        if row is not None and row.role != want and not force:
            raise AdminError(
                f"{name} is already enrolled as a {row.role}; enrolling it as a {want.value} "
                "needs --force (or use another name)"
            )
        if out.is_dir():
            raise AdminError(f"--out {out} is a directory; name the bundle file to write")
        if out.exists() and not force:
            raise AdminError(f"--out {out} already exists; add --force to overwrite it")
        if not out.parent.is_dir():
            raise AdminError(f"--out {out}: directory {out.parent} does not exist")
        cert, key, serial = issue_certificate(
            paths.ca_cert.read_bytes(), paths.ca_key.read_bytes(), name, want
        )
        write_bundle(
            out,
            Bundle(
                name=name,
                role=want,
                ca_pem=paths.ca_cert.read_bytes(),
                cert_pem=cert,
                key_pem=key,
                signing_pub_pem=paths.signing_pub.read_bytes(),
            ),
        )
        try:
            # The allow-list: this serial and key are the node from now on
            # (a re-issued bundle's predecessor is refused).
            admin.db.enroll(name, want, serial, public_key_der(cert))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                out.unlink()
            raise
    finally:
        admin.close()


def init_node(
    home: Path,
    role: Role,
    bundle_path: Path,
    parent: tuple[str, int],
    listen: tuple[str, int] | None = None,
) -> NodeConfig:
    """Set up a relay or client home from its enrolment bundle."""
    bundle = read_bundle(bundle_path)
    if bundle.role != role:
        raise AdminError(f"bundle {bundle_path} is for a {bundle.role}, not a {role}")
    cfg = NodeConfig(home=home, role=role, name=bundle.name, parent=parent, listen=listen)
    paths = _fresh_home(home)
    atomic_write(paths.ca_cert, bundle.ca_pem)
    atomic_write(paths.cert, bundle.cert_pem)
    atomic_write(paths.key, bundle.key_pem, mode=0o600)
    atomic_write(paths.signing_pub, bundle.signing_pub_pem)
    JobDB(paths.db).close()
    cfg.save()
    return cfg
