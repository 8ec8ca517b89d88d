"""The store's data path: each byte hashed once, verification at rest only
when a package may have changed, one disk read per chunk for many readers,
and chunks of a running download forwarded from memory (cut-through)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from rdsd.admin import Admin
from rdsd.config import HomePaths, NodeConfig
from rdsd.errors import CorruptChunk, PackingError, StoreError
from rdsd.node.install import EarlyExtract
from rdsd.packages.manifest import Envelopes, Manifest
from rdsd.packages.packing import safe_extract, safe_extract_stream
from rdsd.packages.store import CACHE_BYTES, Store
from rdsd.security import Verifier
from tests.helpers import Deployment, make_payload_dir

MiB = 1024 * 1024
CHUNK = 256 * 1024


def server_store(dep: Deployment, size: int) -> tuple[Store, Manifest, bytes]:
    """A fresh Store over the server's storehouse holding one package of
    ``size`` payload bytes in 256 KiB chunks, as a restarted node sees it."""
    home = dep.server.home
    replace(NodeConfig.load(home), chunk_size=CHUNK).save()
    src = make_payload_dir(dep.root / "src", size)
    with Admin(home) as admin:
        pid = admin.add_package(src, "tool", "1.0")
    store = new_store(HomePaths(home).store, home)
    m = store.manifest(pid)
    env = store.envelope(pid)
    assert m is not None and env is not None
    return store, m, env


def new_store(root: Path, home: Path) -> Store:
    paths = HomePaths(home)
    store = Store(root, Envelopes(Verifier(paths.signing_pub.read_bytes())))
    store.prepare()
    return store


def file_bytes(store: Store, pid: str) -> bytes:
    return store.data_path(pid).read_bytes()


async def read_all(store: Store, pid: str, offset: int = 0) -> bytes:
    out = bytearray()
    async for pos, data in store.chunks(pid, offset):
        assert pos == offset + len(out)
        out += data
    return bytes(out)


def flip(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


async def test_first_serve_verifies_and_later_serves_do_not_hash(deployment: Deployment) -> None:
    store, m, _ = server_store(deployment, 2 * MiB)
    assert not store.verified(m.id), "a package found at start is not trusted yet"
    assert await read_all(store, m.id) == file_bytes(store, m.id)
    assert store.verified(m.id), "a whole first serve checked every chunk"
    # Verified: an install does not hash it again in this run.
    assert await store.verify_at_rest(m.id) is False
    # A restart (a new Store over the same files) trusts nothing it did not check.
    again = new_store(store.root, deployment.server.home)
    assert not again.verified(m.id)
    assert await again.verify_at_rest(m.id) is True
    assert again.verified(m.id)


async def test_partial_first_serve_does_not_count_as_verification(
    deployment: Deployment,
) -> None:
    store, m, _ = server_store(deployment, 2 * MiB)
    await read_all(store, m.id, offset=4 * CHUNK)
    assert not store.verified(m.id), "only a pass from byte zero covers every chunk"


async def test_tampering_after_verification_is_caught_at_the_next_serve_and_install(
    deployment: Deployment,
) -> None:
    store, m, _ = server_store(deployment, 2 * MiB)
    store.verify(m.id)
    assert store.verified(m.id)
    await read_all(store, m.id)  # fills the shared cache with good chunks
    bad = 5 * CHUNK + 17
    flip(store.data_path(m.id), bad)
    assert not store.verified(m.id), "a write to the file moves its ctime"
    with pytest.raises(CorruptChunk) as caught:
        await read_all(store, m.id)
    assert caught.value.offset == 5 * CHUNK
    with pytest.raises(CorruptChunk):
        await store.verify_at_rest(m.id)
    assert not store.verified(m.id)


async def test_stored_packages_are_checked_after_a_start_in_the_background(
    deployment: Deployment,
) -> None:
    """After a start the store checks what it holds on its own (and again on
    a schedule): a good package is then served without hashing, a damaged
    one is taken out of service before anyone asks for it."""
    store, m, _ = server_store(deployment, 1 * MiB)
    relay = Store(store.root, store.envelopes, refetchable=True)
    flip(relay.data_path(m.id), 3 * CHUNK + 5)
    task = asyncio.create_task(relay.verify_stored(every=3600))
    try:
        await wait_until_true(lambda: not relay.has(m.id))
    finally:
        task.cancel()
    part = relay.partial_dir / f"{m.id}.part"
    assert part.stat().st_size == 3 * CHUNK, "the good prefix is kept for a resume"

    good, m2, _ = server_store_again(deployment)
    task = asyncio.create_task(good.verify_stored(every=3600))
    try:
        await wait_until_true(lambda: good.verified(m2.id))
    finally:
        task.cancel()


async def wait_until_true(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not pred():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def server_store_again(dep: Deployment) -> tuple[Store, Manifest, bytes]:
    """A second package in the same storehouse, seen by a fresh Store."""
    src = make_payload_dir(dep.root / "src2", 512 * 1024)
    with Admin(dep.server.home) as admin:
        pid = admin.add_package(src, "other", "1.0")
    store = new_store(HomePaths(dep.server.home).store, dep.server.home)
    m, env = store.manifest(pid), store.envelope(pid)
    assert m is not None and env is not None
    return store, m, env


async def test_fan_out_reads_each_chunk_from_disk_once(deployment: Deployment) -> None:
    size = 3 * CACHE_BYTES  # more than the shared cache holds at once
    store, m, _ = server_store(deployment, size)
    want = file_bytes(store, m.id)
    got = await asyncio.gather(*(read_all(store, m.id) for _ in range(8)))
    assert all(g == want for g in got)
    assert store.disk_reads == len(m.chunks), (store.disk_reads, len(m.chunks))


async def test_cut_through_serves_a_running_download_from_memory(
    deployment: Deployment, tmp_path: Path
) -> None:
    """A relay's children follow its download: every chunk they get comes
    from memory as soon as it is verified, none from the relay's disk."""
    server, m, env = server_store(deployment, 3 * MiB)
    want = file_bytes(server, m.id)
    relay = new_store(tmp_path / "relay-store", deployment.server.home)
    dl = await relay.begin_download(env, m, resume=False)
    readers = [asyncio.create_task(read_all(relay, m.id)) for _ in range(3)]
    await asyncio.sleep(0)
    async for pos, data in server.chunks(m.id, 0):
        await dl.write_chunk(pos, bytes(data))
        await dl.flush()
        await asyncio.sleep(0)  # let the readers take it while it is fresh
    await dl.finish()
    got = await asyncio.wait_for(asyncio.gather(*readers), 10)
    assert all(g == want for g in got)
    assert relay.disk_reads == 0, "followers read the relay's disk"
    # Finished in this run with every chunk checked and fsynced: verified, no re-hash.
    assert relay.verified(m.id)
    assert hashlib.sha256((relay.data_path(m.id)).read_bytes()).digest() == m.sha256


async def test_a_bad_chunk_is_never_cached_nor_written(
    deployment: Deployment, tmp_path: Path
) -> None:
    server, m, env = server_store(deployment, 1 * MiB)
    relay = new_store(tmp_path / "relay-store", deployment.server.home)
    dl = await relay.begin_download(env, m, resume=False)
    follower = asyncio.create_task(read_all(relay, m.id))  # a child being served
    await asyncio.sleep(0)
    with server.data_path(m.id).open("rb") as f:
        good = f.read(CHUNK)
    await dl.write_chunk(0, good)
    await dl.flush()
    with pytest.raises(CorruptChunk):
        await dl.write_chunk(CHUNK, b"\0" * CHUNK)
        await dl.flush()
    assert dl.verified == CHUNK
    assert relay.cache.get(m.id, 1) is None
    assert relay.cache.get(m.id, 0) is not None
    dl.fail("corrupt chunk", keep_partial=True)
    with pytest.raises(StoreError, match="upstream fetch failed"):
        await asyncio.wait_for(follower, 10)


async def test_a_download_nobody_follows_caches_nothing(
    deployment: Deployment, tmp_path: Path
) -> None:
    """A client's own download is not kept in memory: only a relay's
    children following it need the chunks there."""
    server, m, env = server_store(deployment, 1 * MiB)
    client = new_store(tmp_path / "client-store", deployment.server.home)
    dl = await client.begin_download(env, m, resume=False)
    async for pos, data in server.chunks(m.id, 0):
        await dl.write_chunk(pos, bytes(data))
    await dl.finish()
    assert all(client.cache.get(m.id, i) is None for i in range(len(m.chunks)))


# -- extraction overlapped with the download -------------------------------------------------


def tree(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path under ``root`` with its mode and (for files) content."""
    out: dict[str, tuple[int, bytes | None]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        out[str(path.relative_to(root))] = (
            st.st_mode,
            path.read_bytes() if path.is_file() else None,
        )
    return out


def nested_source(root: Path) -> Path:
    src = make_payload_dir(root, 1 * MiB + 77)
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "sub" / "deeper" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (src / "sub" / "deeper" / "tool").chmod(0o755)
    (src / "sub" / "empty").mkdir()
    (src / "sub" / "note.txt").write_text("words\n" * 1000)
    return src


async def test_overlapped_extraction_gives_the_tree_a_whole_extraction_gives(
    deployment: Deployment, tmp_path: Path
) -> None:
    home = deployment.server.home
    replace(NodeConfig.load(home), chunk_size=CHUNK).save()
    with Admin(home) as admin:
        pid = admin.add_package(nested_source(deployment.root / "nested"), "nested", "1.0")
    server = new_store(HomePaths(home).store, home)
    m, env = server.manifest(pid), server.envelope(pid)
    assert m is not None and env is not None
    whole = tmp_path / "whole"
    whole.mkdir()
    safe_extract(server.data_path(pid), whole)

    client = new_store(tmp_path / "client-store", home)
    dl = await client.begin_download(env, m, resume=False)
    work = tmp_path / "work"
    early = EarlyExtract.start(client, m, work, "c1", "job1")
    assert early is not None
    async for pos, data in server.chunks(pid, 0):
        await dl.write_chunk(pos, bytes(data))
        await dl.flush()
        await asyncio.sleep(0.01)  # the extractor works while "later chunks arrive"
        assert not early._fut.done() or pos + len(data) >= m.size - 2 * CHUNK
    await dl.finish()
    assert await asyncio.wait_for(early.result(), 10)
    assert tree(early.staging) == tree(whole)
    await early.discard()
    assert not early.staging.exists()


async def test_overlapped_extraction_never_sees_a_bad_chunk(
    deployment: Deployment, tmp_path: Path
) -> None:
    """A chunk that does not match its digest is refused by the download and
    never reaches the extractor: the extraction gives up with nothing left
    behind, and the install extracts from the stored archive later."""
    server, m, env = server_store(deployment, 2 * MiB)
    client = new_store(tmp_path / "client-store", deployment.server.home)
    dl = await client.begin_download(env, m, resume=False)
    early = EarlyExtract.start(client, m, tmp_path / "work", "c1", "job1")
    assert early is not None
    chunks = [bytes(d) async for _, d in server.chunks(m.id, 0)]
    await dl.write_chunk(0, chunks[0])
    await dl.flush()
    bad = bytearray(chunks[1])
    bad[100] ^= 0xFF
    with pytest.raises(CorruptChunk):
        await dl.write_chunk(CHUNK, bytes(bad))
        await dl.flush()
    dl.fail("corrupt chunk", keep_partial=True)
    assert await asyncio.wait_for(early.result(), 10) is False
    assert list(early.staging.iterdir()) == [], "a partial tree was left"
    # What the extractor read is what was verified: the bad bytes are not on disk.
    with dl.path.open("rb") as f:
        f.seek(CHUNK)
        assert f.read(CHUNK) != bytes(bad)
    await early.discard()
    assert not early.staging.exists()


def test_streaming_extraction_refuses_a_bad_member_after_good_ones(tmp_path: Path) -> None:
    """A member that breaks the rules after others were written: everything
    written so far goes, and the error names the member."""
    import io
    import tarfile

    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tar:
        for name in ("a.txt", "b.txt"):
            info = tarfile.TarInfo(name)
            info.size = 5
            tar.addfile(info, io.BytesIO(b"hello"))
        link = tarfile.TarInfo("evil")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    dest = tmp_path / "dest"
    dest.mkdir()
    with archive.open("rb") as raw, pytest.raises(PackingError, match="evil"):
        safe_extract_stream(raw, dest, archive)
    assert list(dest.iterdir()) == []
