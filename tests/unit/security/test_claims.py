"""Self-signed claims: a node signs what it says about itself, and only its
enrolled key verifies it; each kind of claim is its own domain."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from protocol import Report
from rdsd.claims import (
    ATTACH_TAG,
    KEYS_KEPT,
    ClaimError,
    ClaimSigner,
    Keys,
    decode_attach,
    public_key_der,
    report_body,
    verify_attach,
    verify_report,
)
from rdsd.security import create_ca, issue_certificate


@pytest.fixture(scope="module")
def certs() -> dict[str, tuple[bytes, bytes]]:
    ca_cert, ca_key = create_ca("test")
    out = {}
    for name in ("c1", "c2"):
        cert, key, _ = issue_certificate(ca_cert, ca_key, name, "client")
        out[name] = (cert, key)
    return out


def report(**changes: object) -> Report:
    rep = Report(
        report_id="c1:7", job="j1", node="c1", state="installed", seq=7, detail="ok",
        package="app-1", time=1_800_000_000.25, origin="c1",
    )  # fmt: skip
    return dataclasses.replace(rep, **changes)  # type: ignore[arg-type]


def test_an_attach_claim_verifies_with_its_own_key_only(certs: dict) -> None:  # type: ignore[type-arg]
    keys = Keys()
    signer = ClaimSigner(certs["c1"][1])
    raw = signer.attach("c1", "client", "relay1", 42, 1_800_000_000.0)
    claim = verify_attach(raw, keys.get(public_key_der(certs["c1"][0])))
    assert (claim.node, claim.role, claim.parent, claim.counter) == ("c1", "client", "relay1", 42)
    assert claim.raw == raw
    with pytest.raises(ClaimError, match="not signed by its node's enrolled key"):
        verify_attach(raw, keys.get(public_key_der(certs["c2"][0])))


def test_a_changed_attach_claim_no_longer_verifies(certs: dict) -> None:  # type: ignore[type-arg]
    key = Keys().get(public_key_der(certs["c1"][0]))
    raw = ClaimSigner(certs["c1"][1]).attach("c1", "client", "relay1", 42, 1_800_000_000.0)
    _body, sig = msgpack.unpackb(raw)
    forged_body = msgpack.packb([ATTACH_TAG, "c1", "client", "relay-evil", 42, 1_800_000_000.0])
    with pytest.raises(ClaimError):
        verify_attach(msgpack.packb([forged_body, sig]), key)


@pytest.mark.parametrize(
    "raw",
    [b"", b"\xc1", msgpack.packb([b"x"]), msgpack.packb(["a", "b"]),
     msgpack.packb([msgpack.packb(["rdsd-report/1", "c1", "client", "p", 1, 1.0]), b"s"]),
     msgpack.packb([msgpack.packb([ATTACH_TAG, "../x", "client", "p", 1, 1.0]), b"s"]),
     msgpack.packb([msgpack.packb([ATTACH_TAG, "c1", "server", "p", 1, 1.0]), b"s"]),
     msgpack.packb([msgpack.packb([ATTACH_TAG, "c1", "client", "p", -1, 1.0]), b"s"]),
     msgpack.packb([msgpack.packb([ATTACH_TAG, "c1", "client", "p", 1, float("nan")]), b"s"])],
)  # fmt: skip
def test_malformed_attach_claims_are_refused(raw: bytes) -> None:
    with pytest.raises(ClaimError):
        decode_attach(raw)


def test_a_report_signature_covers_every_field(certs: dict) -> None:  # type: ignore[type-arg]
    key = Keys().get(public_key_der(certs["c1"][0]))
    signed = ClaimSigner(certs["c1"][1]).report(report())
    verify_report(signed, key)
    for change in (
        {"state": "failed"}, {"detail": "x"}, {"package": "app-2"}, {"seq": 8},
        {"time": 1_800_000_001.25}, {"origin": "c2"}, {"node": "c2"}, {"job": "j2"},
        {"report_id": "c1:8"},
    ):  # fmt: skip
        with pytest.raises(ClaimError):
            verify_report(dataclasses.replace(signed, **change), key)
    with pytest.raises(ClaimError, match="not signed"):
        verify_report(report(), key)
    with pytest.raises(ClaimError):
        verify_report(signed, Keys().get(public_key_der(certs["c2"][0])))


def test_an_integer_time_encodes_as_the_float_it_means() -> None:
    assert report_body(report(time=1_800_000_000)) == report_body(report(time=1_800_000_000.0))


def test_claim_kinds_are_domain_separated(certs: dict) -> None:  # type: ignore[type-arg]
    """A signature made for a report never passes as an attach claim."""
    key = Keys().get(public_key_der(certs["c1"][0]))
    signed = ClaimSigner(certs["c1"][1]).report(report())
    with pytest.raises(ClaimError):
        verify_attach(msgpack.packb([report_body(signed), signed.sig]), key)


def test_loaded_keys_are_kept_for_a_fleet_and_the_oldest_go_first() -> None:
    """A report costs a signature check, not a key parse: a key asked for
    again is the same loaded key, as long as no more than ``size`` others
    were asked for since; the default keeps one for each of 10,000 nodes."""
    ders = [
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        for _ in range(4)
    ]
    keys = Keys(size=3)
    first = [keys.get(d) for d in ders[:3]]
    assert [keys.get(d) for d in ders[:3]] == first and all(
        keys.get(d) is k for d, k in zip(ders[:3], first, strict=True)
    )
    keys.get(ders[1])
    keys.get(ders[2])
    keys.get(ders[3])  # the fourth pushes out the least recently used: ders[0]
    assert keys.get(ders[1]) is first[1]
    assert keys.get(ders[0]) is not first[0]
    assert KEYS_KEPT >= 10_000
