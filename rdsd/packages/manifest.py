"""Package manifests and their signed envelopes.

A manifest says exactly which bytes make up a package: the whole-file
SHA-256 and one SHA-256 per chunk, so a receiver can check every chunk the
moment it arrives and resume from any chunk boundary. The server signs the
canonical msgpack form with Ed25519; relays forward the envelope untouched,
so a client trusts only what the server signed, never what a relay says.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgpack

from protocol import is_package_id, is_safe_name

from ..errors import ManifestError, SecurityError
from ..security import Signer, Verifier

FORMAT = "rdsd-manifest/1"
DIGEST_SIZE = 32
MAX_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    size: int
    sha256: bytes
    chunk_size: int
    chunks: tuple[bytes, ...]
    install: tuple[str, ...]
    keep: int
    added: float

    @property
    def id(self) -> str:
        return f"{self.name}-{self.version}"

    @property
    def expires(self) -> float:
        return self.added + self.keep

    def chunk_length(self, index: int) -> int:
        if index < len(self.chunks) - 1:
            return self.chunk_size
        return self.size - self.chunk_size * (len(self.chunks) - 1)

    def with_keep(self, keep: int) -> Manifest:
        return replace(self, keep=keep)

    def to_bytes(self) -> bytes:
        return msgpack.packb(
            {
                "format": FORMAT,
                "name": self.name,
                "version": self.version,
                "size": self.size,
                "sha256": self.sha256,
                "chunk_size": self.chunk_size,
                "chunks": list(self.chunks),
                "install": list(self.install),
                "keep": self.keep,
                "added": self.added,
            },
            use_bin_type=True,
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> Manifest:
        try:
            obj: Any = msgpack.unpackb(raw, raw=False, strict_map_key=True)
            if not isinstance(obj, dict) or obj.get("format") != FORMAT:
                raise ManifestError("not an rdsd manifest")
            m = cls(
                name=obj["name"],
                version=obj["version"],
                size=obj["size"],
                sha256=obj["sha256"],
                chunk_size=obj["chunk_size"],
                chunks=tuple(obj["chunks"]),
                install=tuple(obj["install"]),
                keep=obj["keep"],
                added=float(obj["added"]),
            )
        except ManifestError:
            raise
        except Exception as exc:
            raise ManifestError(f"malformed manifest: {exc!r}") from None
        m.validate()
        return m

    def validate(self) -> None:
        """Everything a receiver relies on when it turns fields into paths and
        offsets: safe names, consistent sizes, digests of the right length."""
        ok = (
            isinstance(self.name, str)
            and is_safe_name(self.name)
            and isinstance(self.version, str)
            and is_safe_name(self.version)
            and is_package_id(self.id)
            and isinstance(self.size, int)
            and self.size >= 0
            and isinstance(self.chunk_size, int)
            and 0 < self.chunk_size <= MAX_CHUNK
            and isinstance(self.sha256, bytes)
            and len(self.sha256) == DIGEST_SIZE
            and all(isinstance(c, bytes) and len(c) == DIGEST_SIZE for c in self.chunks)
            and len(self.chunks) == max(1, math.ceil(self.size / self.chunk_size))
            and all(isinstance(a, str) for a in self.install)
            and isinstance(self.keep, int)
            and self.keep > 0
        )
        if not ok:
            raise ManifestError(f"manifest for {self.id!r} is inconsistent")


def seal(manifest: Manifest, signer: Signer) -> bytes:
    """The envelope that travels: ``[manifest bytes, Ed25519 signature]``."""
    body = manifest.to_bytes()
    return msgpack.packb([body, signer.sign(body)], use_bin_type=True)


def open_envelope(envelope: bytes, verifier: Verifier) -> Manifest:
    """Verify the server's signature, then parse; raise ManifestError if not."""
    try:
        obj: Any = msgpack.unpackb(envelope, raw=False)
        body, signature = obj
        if not isinstance(body, bytes) or not isinstance(signature, bytes):
            raise ValueError("envelope parts are not bytes")
    except Exception as exc:
        raise ManifestError(f"malformed manifest envelope: {exc!r}") from None
    try:
        verifier.verify(body, signature)
    except SecurityError as exc:
        raise ManifestError(f"manifest signature rejected: {exc}") from None
    return Manifest.from_bytes(body)


class Envelopes:
    """Opens envelopes for one node: each distinct envelope is signature-
    checked and parsed once per process, however many jobs, notices and
    store lookups carry it. Bounded (least recently used first out)."""

    def __init__(self, verifier: Verifier, size: int = 256) -> None:
        self.verifier = verifier
        self._size = size
        self._cache: OrderedDict[bytes, Manifest] = OrderedDict()

    def open(self, envelope: bytes) -> Manifest:
        """The manifest inside ``envelope``; raises ManifestError if the
        server did not sign it."""
        key = hashlib.sha256(envelope).digest()
        found = self._cache.get(key)
        if found is not None:
            self._cache.move_to_end(key)
            return found
        manifest = open_envelope(envelope, self.verifier)
        self._cache[key] = manifest
        if len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return manifest

    def open_for(self, envelope: bytes, package: str) -> Manifest:
        """Like ``open``, and the manifest must be for ``package``: a message
        that names one package and carries another's manifest is refused."""
        manifest = self.open(envelope)
        if manifest.id != package:
            raise ManifestError(f"manifest is for {manifest.id}, not {package}")
        return manifest


def build_manifest(
    archive: Path,
    name: str,
    version: str,
    install: tuple[str, ...],
    keep: int,
    chunk_size: int,
    added: float | None = None,
) -> Manifest:
    """Hash ``archive`` in chunks (never whole in memory) into a manifest."""
    whole = hashlib.sha256()
    chunks: list[bytes] = []
    size = 0
    with archive.open("rb") as f:
        while block := f.read(chunk_size):
            whole.update(block)
            chunks.append(hashlib.sha256(block).digest())
            size += len(block)
    if not chunks:
        chunks.append(hashlib.sha256(b"").digest())
    m = Manifest(
        name=name,
        version=version,
        size=size,
        sha256=whole.digest(),
        chunk_size=chunk_size,
        chunks=tuple(chunks),
        install=install,
        keep=keep,
        added=time.time() if added is None else added,
    )
    m.validate()
    return m
