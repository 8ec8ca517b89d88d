"""Packing a package directory and extracting it safely (rdsd.packing).

Hostile archives are built by hand with tarfile, so each refusal test shows
exactly which header field the defence keys on. Every refusal also checks the
two promises that matter on a client: nothing was written outside the
destination, and nothing at all was extracted into it.
"""

from __future__ import annotations

import io
import os
import socket
import stat
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rdsd.errors import PackingError
from rdsd.packages.packing import ExtractLimits, pack_directory, safe_extract

Snapshot = dict[str, tuple[str, bytes | None, int]]


def snapshot(root: Path) -> Snapshot:
    """Every entry under root: kind, content (files) and owner-exec bit."""
    result: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            st_ = path.lstat()
            if stat.S_ISDIR(st_.st_mode):
                result[rel] = ("dir", None, 0)
            elif stat.S_ISREG(st_.st_mode):
                result[rel] = ("file", path.read_bytes(), st_.st_mode & stat.S_IXUSR)
            else:
                result[rel] = ("other", None, st_.st_mode)
    return result


def make_tree(root: Path) -> None:
    root.mkdir()
    (root / "install.sh").write_text("#!/bin/sh\necho installed\n")
    (root / "install.sh").chmod(0o755)
    (root / "empty").write_bytes(b"")
    (root / "lib" / "sub" / "deep").mkdir(parents=True)
    (root / "lib" / "x.py").write_text("print('x')\n")
    (root / "lib" / "sub" / "data.bin").write_bytes(bytes(range(256)) * 64 + os.urandom(3 * 2**20))
    (root / "lib" / "sub" / "deep" / "tool").write_bytes(b"\x7fELF\x00\x01")
    (root / "lib" / "sub" / "deep" / "tool").chmod(0o700)
    (root / "emptydir").mkdir()
    (root / "non-ascii-ü.txt").write_text("unicode name\n")
    long_dir = root / ("d" * 60) / ("e" * 60)
    long_dir.mkdir(parents=True)
    (long_dir / ("f" * 80)).write_bytes(b"long path\n")


def fresh_dest(tmp_path: Path) -> Path:
    dest = tmp_path / "area" / "dest"
    dest.mkdir(parents=True)
    return dest


# --------------------------------------------------------------------------
# Round trip
# --------------------------------------------------------------------------


def test_pack_extract_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    archive = tmp_path / "pkg.tar"
    pack_directory(src, archive)

    dest = fresh_dest(tmp_path)
    safe_extract(archive, dest)

    assert snapshot(dest) == snapshot(src)
    assert os.access(dest / "install.sh", os.X_OK)
    assert (dest / "install.sh").stat().st_mode & 0o777 == 0o755
    assert (dest / "lib" / "x.py").stat().st_mode & stat.S_IXUSR == 0


def test_archive_layout(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    archive = tmp_path / "pkg.tar"
    pack_directory(src, archive)

    with tarfile.open(archive, "r:") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert "install.sh" in names and "lib/x.py" in names
    assert not any(n.startswith(("/", "./")) or n in ("", ".") for n in names)
    # Sorted depth-first: every directory before its contents, siblings sorted.
    assert names.index("lib") < names.index("lib/sub") < names.index("lib/sub/data.bin")
    top = [n for n in names if "/" not in n]
    assert top == sorted(top)
    for m in members:
        assert (m.uid, m.gid, m.uname, m.gname) == (0, 0, "", "")
        assert m.isreg() or m.isdir()
    by_name = {m.name: m for m in members}
    assert by_name["install.sh"].mode == 0o755
    assert by_name["lib/sub/data.bin"].mtime == int((src / "lib/sub/data.bin").stat().st_mtime)


def test_packing_is_reproducible(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    pack_directory(src, tmp_path / "a.tar")
    pack_directory(src, tmp_path / "b.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_empty_directory_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    pack_directory(src, tmp_path / "pkg.tar")
    dest = fresh_dest(tmp_path)
    safe_extract(tmp_path / "pkg.tar", dest)
    assert list(dest.iterdir()) == []


def test_extract_accepts_dot_slash_names_and_exact_limits(tmp_path: Path) -> None:
    """Archives written by `tar -C src .` name members './x'; limits are inclusive."""
    archive = tmp_path / "dot.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(dir_info("./"))
        tar.addfile(dir_info("./d"))
        add_bytes(tar, "./d/f", b"12345")
        add_bytes(tar, "./g", b"67890")
    dest = fresh_dest(tmp_path)
    safe_extract(archive, dest, ExtractLimits(max_members=4, max_total_size=10))
    assert (dest / "d" / "f").read_bytes() == b"12345"
    assert (dest / "g").read_bytes() == b"67890"


# --------------------------------------------------------------------------
# Hostile archives
# --------------------------------------------------------------------------


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))


def dir_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info


def special(name: str, kind: bytes, linkname: str = "") -> Callable[[tarfile.TarFile], None]:
    def build(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = linkname
        if kind == tarfile.CHRTYPE:
            info.devmajor, info.devminor = 1, 3
        tar.addfile(info)

    return build


def plain(name: str, data: bytes = b"evil\n") -> Callable[[tarfile.TarFile], None]:
    return lambda tar: add_bytes(tar, name, data)


def nul_name(tar: tarfile.TarFile) -> None:
    # A NUL cannot survive a ustar name field, but it can ride in a PAX path.
    info = tarfile.TarInfo("placeholder")
    info.pax_headers = {"path": "good\x00../../evil"}
    info.size = 4
    tar.addfile(info, io.BytesIO(b"evil"))


def duplicate(tar: tarfile.TarFile) -> None:
    add_bytes(tar, "dup", b"one")
    add_bytes(tar, "dup", b"two")


def build_hostile(tmp_path: Path, build: Callable[[tarfile.TarFile], None]) -> Path:
    """A tar whose first member is harmless, so 'nothing extracted' means something."""
    archive = tmp_path / "hostile.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        add_bytes(tar, "harmless.txt", b"fine\n")
        build(tar)
    return archive


def assert_refused(
    tmp_path: Path, archive: Path, limits: ExtractLimits | None = None, match: str | None = None
) -> PackingError:
    dest = fresh_dest(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(PackingError, match=match) as info:
        safe_extract(archive, dest, limits or ExtractLimits())
    assert list(dest.iterdir()) == [], "something was extracted"
    assert snapshot(tmp_path) == before, "something was written outside dest"
    return info.value


HOSTILE: dict[str, tuple[Callable[[tarfile.TarFile], None], str]] = {
    "absolute": (plain("/PLACEHOLDER/abs-evil"), "absolute"),
    "dotdot": (plain("../evil"), r"'\.\.'"),
    "nested-dotdot": (plain("a/../../evil"), r"'\.\.'"),
    "dotdot-dir": (lambda tar: tar.addfile(dir_info("sub/../..")), r"'\.\.'"),
    "nul": (nul_name, "NUL"),
    "symlink": (special("link", tarfile.SYMTYPE, "/etc/passwd"), "symbolic link"),
    "relative-symlink": (special("link", tarfile.SYMTYPE, "harmless.txt"), "symbolic link"),
    "hardlink": (special("hard", tarfile.LNKTYPE, "harmless.txt"), "hard link"),
    "chardev": (special("null", tarfile.CHRTYPE), "device"),
    "blockdev": (special("sda", tarfile.BLKTYPE), "device"),
    "fifo": (special("pipe", tarfile.FIFOTYPE), "FIFO"),
    "unknown-type": (special("weird", b"Z"), "unsupported type"),
    "duplicate": (duplicate, "more than once"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_member_refused(tmp_path: Path, case: str) -> None:
    build, match = HOSTILE[case]
    if case == "absolute":
        target = tmp_path / "outside" / "abs-evil"
        build = plain(str(target))
    archive = build_hostile(tmp_path, build)
    with tarfile.open(archive) as tar:  # the hostile name really is in the archive
        assert len(tar.getmembers()) >= 2
    err = assert_refused(tmp_path, archive, match=match)
    assert "member" in str(err)
    if case == "absolute":
        assert not (tmp_path / "outside").exists()


def test_absolute_name_kept_verbatim_by_builder(tmp_path: Path) -> None:
    """Guard the test itself: tarfile must not have stripped the leading '/'."""
    archive = build_hostile(tmp_path, plain("/abs/evil"))
    with tarfile.open(archive) as tar:
        assert "/abs/evil" in tar.getnames()


def test_too_many_members_refused(tmp_path: Path) -> None:
    def build(tar: tarfile.TarFile) -> None:
        for i in range(4):
            add_bytes(tar, f"f{i}", b"x")

    archive = build_hostile(tmp_path, build)  # 5 members in all
    assert_refused(tmp_path, archive, ExtractLimits(max_members=4), match="more than 4 members")


def test_declared_size_over_limit_refused(tmp_path: Path) -> None:
    def build(tar: tarfile.TarFile) -> None:
        add_bytes(tar, "a", b"x" * 30)
        add_bytes(tar, "b", b"y" * 30)

    archive = build_hostile(tmp_path, build)  # 5 + 30 + 30 bytes declared
    assert_refused(tmp_path, archive, ExtractLimits(max_total_size=50), match="more than 50 bytes")


def test_huge_declared_size_refused_without_reading(tmp_path: Path) -> None:
    """A header claiming 1 TiB is refused from the header alone (the data is absent)."""
    archive = tmp_path / "bomb.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("bomb")
        info.size = 2**40
        tar.addfile(info)  # header only; the data is simply not there
    assert_refused(tmp_path, archive, match="bytes of file data")


def test_oversized_pax_header_refused(tmp_path: Path) -> None:
    """A PAX header may not make tarfile buffer an arbitrary blob in one read."""
    archive = tmp_path / "pax.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("f")
        info.pax_headers = {"comment": "x" * (2 * 2**20)}
        tar.addfile(info)
    assert_refused(tmp_path, archive, match="at once")


def good_archive(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(5000))
    (src / "b").write_bytes(os.urandom(5000))
    archive = tmp_path / "good.tar"
    pack_directory(src, archive)
    return archive


def truncate_at(archive: Path, where: Callable[[int, list[tarfile.TarInfo]], int]) -> None:
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
    size = archive.stat().st_size
    data = archive.read_bytes()[: where(size, members)]
    archive.write_bytes(data)


TRUNCATIONS: dict[str, Callable[[int, list[tarfile.TarInfo]], int]] = {
    "inside-last-data": lambda size, ms: ms[-1].offset_data + 100,
    "inside-first-data": lambda size, ms: ms[0].offset_data + 100,
    "inside-last-header": lambda size, ms: ms[-1].offset + 200,
    "at-header-boundary": lambda size, ms: ms[-1].offset,
    "no-end-marker": lambda size, ms: ms[-1].offset_data + 5120,
    "half-end-marker": lambda size, ms: ms[-1].offset_data + 5120 + 512,
}


@pytest.mark.parametrize("case", sorted(TRUNCATIONS))
def test_truncated_archive_refused(tmp_path: Path, case: str) -> None:
    archive = good_archive(tmp_path)
    truncate_at(archive, TRUNCATIONS[case])
    assert_refused(tmp_path, archive)


def test_corrupt_header_refused(tmp_path: Path) -> None:
    archive = good_archive(tmp_path)
    with tarfile.open(archive) as tar:
        second = tar.getmembers()[1].offset
    data = bytearray(archive.read_bytes())
    data[second + 10 : second + 20] = b"\xff" * 10  # breaks the header checksum
    archive.write_bytes(bytes(data))
    assert_refused(tmp_path, archive, match="corrupt")


@pytest.mark.parametrize(
    "content",
    [b"", b"not a tar file at all" * 100, os.urandom(10240), b"\x00" * 100],
    ids=["empty", "text", "random", "short-zeros"],
)
def test_unreadable_archive_refused(tmp_path: Path, content: bytes) -> None:
    archive = tmp_path / "junk.tar"
    archive.write_bytes(content)
    assert_refused(tmp_path, archive)


def test_compressed_archive_refused(tmp_path: Path) -> None:
    archive = tmp_path / "pkg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        add_bytes(tar, "a", b"data")
    assert_refused(tmp_path, archive)


def test_bad_mtime_refused(tmp_path: Path) -> None:
    def build(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("when")
        info.pax_headers = {"mtime": "1e300"}
        tar.addfile(info)

    assert_refused(tmp_path, build_hostile(tmp_path, build), match="modification time")


@pytest.mark.parametrize("size", ["-5", "-1000000"])
def test_negative_size_refused(tmp_path: Path, size: str) -> None:
    """A PAX size below zero must not cancel another member's size in the bomb check."""

    def build(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("minus")
        info.pax_headers = {"size": size}
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
        add_bytes(tar, "after", b"def")

    assert_refused(tmp_path, build_hostile(tmp_path, build), match="negative size")


def test_extract_requires_empty_existing_dest(tmp_path: Path) -> None:
    archive = good_archive(tmp_path)
    with pytest.raises(PackingError, match="not an existing directory"):
        safe_extract(archive, tmp_path / "missing")
    dest = fresh_dest(tmp_path)
    (dest / "already").write_text("here")
    with pytest.raises(PackingError, match="not empty"):
        safe_extract(archive, dest)
    assert [p.name for p in dest.iterdir()] == ["already"]


def test_failure_during_extraction_leaves_dest_empty(tmp_path: Path) -> None:
    """A member that passes the scan but cannot be written (file vs directory clash)."""
    archive = tmp_path / "clash.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        add_bytes(tar, "ok", b"fine")
        add_bytes(tar, "x", b"a file")
        add_bytes(tar, "x/y", b"under a file")
    dest = fresh_dest(tmp_path)
    with pytest.raises(OSError):
        safe_extract(archive, dest)
    assert list(dest.iterdir()) == []


def test_extraction_strips_setuid_and_ownership(tmp_path: Path) -> None:
    archive = tmp_path / "suid.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("suid")
        info.mode = 0o4777
        info.uid = info.gid = 4242
        info.size = 2
        tar.addfile(info, io.BytesIO(b"#!"))
    dest = fresh_dest(tmp_path)
    safe_extract(archive, dest)
    st_ = (dest / "suid").stat()
    assert stat.S_IMODE(st_.st_mode) == 0o755
    assert st_.st_uid == os.geteuid()


# --------------------------------------------------------------------------
# Packing refusals
# --------------------------------------------------------------------------


def src_with(tmp_path: Path, add: Callable[[Path], None]) -> Path:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "fine.txt").write_text("fine\n")
    add(src / "sub")
    return src


def hard_linked(d: Path) -> None:
    (d / "orig").write_text("shared\n")
    os.link(d / "orig", d / "hard")


PACK_REFUSALS: dict[str, tuple[Callable[[Path], None], str]] = {
    "symlink": (lambda d: (d / "link").symlink_to("/etc/passwd"), "symbolic link"),
    "dangling-symlink": (lambda d: (d / "link").symlink_to("nowhere"), "symbolic link"),
    "dir-symlink": (lambda d: (d / "link").symlink_to(d.parent), "symbolic link"),
    "hardlink": (hard_linked, "hard link"),
    "fifo": (lambda d: os.mkfifo(d / "pipe"), "FIFO"),
}


@pytest.mark.parametrize("case", sorted(PACK_REFUSALS))
def test_pack_refuses_special_entries(tmp_path: Path, case: str) -> None:
    add, match = PACK_REFUSALS[case]
    src = src_with(tmp_path, add)
    dest = tmp_path / "out" / "pkg.tar"
    dest.parent.mkdir()
    with pytest.raises(PackingError, match=match) as info:
        pack_directory(src, dest)
    assert "sub/" in str(info.value)
    assert not dest.exists(), "refused before creating the archive"


def test_pack_refuses_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = src_with(tmp_path, lambda d: None)
    # AF_UNIX paths are short: bind by a relative name from inside the directory.
    monkeypatch.chdir(src / "sub")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("sock")
        with pytest.raises(PackingError, match="socket"):
            pack_directory(src, tmp_path / "pkg.tar")


def test_pack_refuses_non_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(PackingError, match="not a directory"):
        pack_directory(tmp_path / "file", tmp_path / "a.tar")
    with pytest.raises(PackingError, match="does not exist"):
        pack_directory(tmp_path / "missing", tmp_path / "b.tar")
    assert not (tmp_path / "a.tar").exists() and not (tmp_path / "b.tar").exists()


def test_pack_refuses_dest_inside_src(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    with pytest.raises(PackingError, match="inside the source"):
        pack_directory(src, src / "lib" / "pkg.tar")
    assert not (src / "lib" / "pkg.tar").exists()


def test_pack_follows_symlinked_root(tmp_path: Path) -> None:
    """The operator may name the source through a symlink; only its contents must be plain."""
    src = tmp_path / "src"
    make_tree(src)
    (tmp_path / "alias").symlink_to(src)
    pack_directory(tmp_path / "alias", tmp_path / "pkg.tar")
    dest = fresh_dest(tmp_path)
    safe_extract(tmp_path / "pkg.tar", dest)
    assert snapshot(dest) == snapshot(src)


# --------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------

NAME = st.text(alphabet="abcXYZ019_-.ü", min_size=1, max_size=8).filter(
    lambda s: s not in (".", "..")
)
TREE = st.dictionaries(
    keys=st.lists(NAME, min_size=1, max_size=3).map(tuple),
    values=st.tuples(st.binary(max_size=4096), st.booleans()),
    max_size=12,
)


def without_prefix_clashes(
    tree: dict[tuple[str, ...], tuple[bytes, bool]],
) -> dict[tuple[str, ...], tuple[bytes, bool]]:
    """Drop files whose path is also a directory of another file."""
    dirs = {path[:i] for path in tree for i in range(1, len(path))}
    return {path: value for path, value in tree.items() if path not in dirs}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=TREE)
def test_random_trees_round_trip(tree: dict[tuple[str, ...], tuple[bytes, bool]]) -> None:
    files = without_prefix_clashes(tree)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        src = base / "src"
        src.mkdir()
        for path, (data, executable) in files.items():
            target = src.joinpath(*path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            target.chmod(0o755 if executable else 0o644)
        archive = base / "pkg.tar"
        pack_directory(src, archive)
        dest = base / "dest"
        dest.mkdir()
        safe_extract(archive, dest)
        assert snapshot(dest) == snapshot(src)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    flips=st.lists(
        st.tuples(st.integers(min_value=0, max_value=4095), st.integers(1, 255)),
        min_size=1,
        max_size=4,
    )
)
def test_corrupted_archives_fail_cleanly(flips: list[tuple[int, int]]) -> None:
    """Any byte damage to the headers gives success or PackingError/OSError, never a
    partial tree or a stray exception type, and never a write outside dest."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        src = base / "src"
        (src / "d").mkdir(parents=True)
        (src / "d" / "f").write_bytes(b"hello" * 100)
        (src / "g").write_bytes(b"world")
        archive = base / "pkg.tar"
        pack_directory(src, archive)
        data = bytearray(archive.read_bytes())
        for offset, xor in flips:
            data[offset % len(data)] ^= xor
        archive.write_bytes(bytes(data))
        dest = base / "area" / "dest"
        dest.mkdir(parents=True)
        before = snapshot(base)
        try:
            safe_extract(archive, dest)
        except (PackingError, OSError):
            assert list(dest.iterdir()) == []
            assert snapshot(base) == before
        else:
            after = snapshot(base)
            outside = {k for k in after if not k.startswith("area/dest/")}
            assert outside == set(before)
