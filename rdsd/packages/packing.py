"""Packing a package directory into a tar archive, and extracting one safely.

A package travels as one uncompressed POSIX (PAX) tar. Plain tar keeps the
format simple to chunk, resume and hash (the manifest digests the archive
bytes, so compression would only add a decompression-bomb surface), and the
archive is produced by :func:`pack_directory` on the managing server.

Extraction runs on every client, usually as root, right before the package's
install command. The archive is signed, so a hostile archive means a broken
server or signing key; :func:`safe_extract` still treats it as untrusted input
(defence in depth): it scans the whole archive and refuses it *before writing
anything* if any member could escape the destination, create a link, device
or FIFO, or if the archive is an archive bomb; only then does it extract,
through tarfile's ``data`` filter as a second line of defence.

Neither direction holds a whole file, or the whole package, in memory: file
data is streamed in small blocks in both directions.
"""

from __future__ import annotations

import math
import os
import shutil
import stat
import tarfile
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import PackingError

__all__ = ["ExtractLimits", "PackingError", "pack_directory", "safe_extract"]

# tarfile itself reads file data in 16 KiB blocks and headers in 512-byte
# blocks; only PAX extended headers and GNU long names are read in one piece,
# sized by a field of the (untrusted) header. Any single read above this
# bound therefore means a hostile header asking us to buffer a huge blob.
_MAX_SINGLE_READ = 1 << 20

# Block size used when we scan or copy ourselves.
_CHUNK = 1 << 16
# What tarfile copies a member's data in: its default (16 KiB) made
# extraction a Python step per 16 KiB, each taking the GIL back from the
# threads receiving and writing the package while it streams in.
_COPY_BUFFER = _MAX_SINGLE_READ

# An mtime outside this range cannot be applied by os.utime on every platform
# (OverflowError) and is nonsense for a package anyway; refuse it in the scan
# rather than fail half-way through extraction.
_MAX_ABS_MTIME = 2**40

_DIR_OPEN_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: should a FIFO be swapped in after the scan, open() must not hang.
_FILE_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


@dataclass(frozen=True)
class ExtractLimits:
    """Bounds that make an archive bomb fail the scan instead of the disk.

    ``max_members`` bounds the member count (inodes, and the metadata tarfile
    keeps per member). ``max_total_size`` bounds the sum of the sizes the
    archive *declares* for its regular files, which is exactly what extraction
    would write. Packages are plain tar, whose output never exceeds its
    input, so no expansion ratio needs checking.
    """

    max_members: int = 100_000
    max_total_size: int = 64 * 2**30


# --------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One source entry, named relative to the directory fd that holds it.

    Holding ``parent_fd`` (open while the walk is suspended on this entry)
    lets the writer open the file with ``dir_fd`` and ``O_NOFOLLOW``: a
    directory swapped for a symlink after the scan cannot redirect the read.
    """

    parent_fd: int
    name: str
    arcname: str
    st: os.stat_result


def _refuse_kind(arcname: str, st: os.stat_result) -> None:
    """Refuse anything but a directory or a singly-linked regular file.

    Packages carry data only: a symlink or hard link would make the content
    depend on what lies outside the package (and extraction refuses links
    anyway), and devices, FIFOs and sockets have no portable meaning.
    """
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        return
    if stat.S_ISREG(mode):
        if st.st_nlink > 1:
            raise PackingError(
                f"{arcname!r}: is a hard link ({st.st_nlink} links); packages carry plain files"
            )
        return
    if stat.S_ISLNK(mode):
        kind = "a symbolic link"
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = "a device"
    elif stat.S_ISFIFO(mode):
        kind = "a FIFO"
    elif stat.S_ISSOCK(mode):
        kind = "a socket"
    else:
        kind = f"of unsupported type {stat.S_IFMT(mode):#o}"
    raise PackingError(f"{arcname!r}: is {kind}; packages carry regular files and directories only")


def _walk(dir_fd: int, prefix: str) -> Iterator[_Entry]:
    """Yield the tree under ``dir_fd`` depth-first, sorted, refusing bad kinds.

    Everything is resolved relative to directory file descriptors opened with
    ``O_NOFOLLOW``, so the walk never leaves the source tree even if it is
    being changed underneath us. Sorting makes the member order (and so the
    archive bytes) independent of directory order on disk.
    """
    with os.scandir(dir_fd) as it:
        names = sorted(entry.name for entry in it)
    for name in names:
        arcname = prefix + name
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        _refuse_kind(arcname, st)
        yield _Entry(dir_fd, name, arcname, st)
        if stat.S_ISDIR(st.st_mode):
            try:
                child = os.open(name, _DIR_OPEN_FLAGS, dir_fd=dir_fd)
            except OSError as exc:
                raise PackingError(f"{arcname!r}: cannot open directory: {exc}") from exc
            try:
                if not os.path.samestat(st, os.fstat(child)):
                    raise PackingError(f"{arcname!r}: changed while being packed")
                yield from _walk(child, arcname + "/")
            finally:
                os.close(child)


def _open_root(src: Path) -> int:
    """Open the source directory, mapping "not a directory" to PackingError.

    ``src`` itself may be a symlink to a directory: the operator named it.
    Only what lies *inside* it must be plain files and directories.
    """
    try:
        return os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise PackingError(f"{src}: does not exist") from exc
    except NotADirectoryError as exc:
        raise PackingError(f"{src}: is not a directory") from exc


def _walk_tree(src: Path) -> Generator[_Entry, None, None]:
    """Walk ``src`` and close every descriptor however the caller stops."""
    root = _open_root(src)
    try:
        yield from _walk(root, "")
    finally:
        os.close(root)


class _ExactReader:
    """A source file that must deliver exactly the size recorded in its header.

    tarfile copies ``size`` bytes from the file object; a file that shrinks
    while being packed would otherwise surface as a bare OSError from inside
    tarfile. Reading through this says which member changed.
    """

    def __init__(self, fd: int, arcname: str) -> None:
        self._fd = fd
        self._arcname = arcname

    def read(self, size: int = -1, /) -> bytes:
        if size < 0:
            return os.read(self._fd, _CHUNK)
        data = os.read(self._fd, size)
        while len(data) < size:
            more = os.read(self._fd, size - len(data))
            if not more:
                # tarfile only ever asks for bytes the header says are there.
                raise PackingError(f"{self._arcname!r}: shrank while being packed")
            data += more
        return data


def _file_info(entry: _Entry, fd: int) -> tuple[tarfile.TarInfo, os.stat_result]:
    """Check the opened file is the one scanned and describe it for tar."""
    st = os.fstat(fd)
    if not os.path.samestat(st, entry.st):
        raise PackingError(f"{entry.arcname!r}: changed while being packed")
    _refuse_kind(entry.arcname, st)
    info = tarfile.TarInfo(entry.arcname)
    info.type = tarfile.REGTYPE
    info.size = st.st_size
    return info, st


def _set_common(info: tarfile.TarInfo, st: os.stat_result) -> None:
    """Fields that make the archive independent of who packed it.

    Ownership is meaningless on the target machines (the data filter drops it
    on extraction), so it is zeroed; the mtime is kept at whole seconds so no
    PAX header is needed just to carry a fraction.
    """
    info.mode = stat.S_IMODE(st.st_mode)
    info.mtime = int(st.st_mtime)
    info.uid = info.gid = 0
    info.uname = info.gname = ""


def _check_dest_outside(src: Path, dest: Path) -> None:
    """Refuse to write the archive inside the tree being packed.

    Otherwise the archive would try to contain itself, growing while read.
    """
    src_real = src.resolve()
    dest_real = dest.parent.resolve() / dest.name
    if dest_real.is_relative_to(src_real):
        raise PackingError(f"{dest}: archive destination lies inside the source {src}")


def pack_directory(src: Path, dest: Path) -> None:
    """Write an uncompressed PAX tar of the *contents* of ``src`` to ``dest``.

    Members are named relative to ``src`` (``install.sh``, ``lib/x.py``), in
    sorted depth-first order (a directory before its contents), with mode
    kept (the exec bit of install scripts matters), mtime in whole seconds,
    uid/gid 0 and empty owner names, so that packing the same tree twice gives
    the same bytes.

    ``dest`` is created or truncated; the caller passes a temporary path and
    does the fsync and rename, so a refusal may leave a partial file there
    for the caller to remove (the whole tree is scanned first, so the usual
    refusals happen before ``dest`` is even created).

    Raises PackingError if ``src`` is not a directory or contains symlinks,
    hard links, devices, FIFOs or sockets, or if it changes while packed.
    """
    _check_dest_outside(src, dest)
    # First pass: refuse a bad tree before creating anything.
    for _ in _walk_tree(src):
        pass
    # Second pass: write. It re-checks every entry, so a tree changed after
    # the first pass is still refused rather than packed wrongly.
    walker = _walk_tree(src)
    try:
        with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar:
            for entry in walker:
                if stat.S_ISDIR(entry.st.st_mode):
                    info = tarfile.TarInfo(entry.arcname)
                    info.type = tarfile.DIRTYPE
                    _set_common(info, entry.st)
                    tar.addfile(info)
                    continue
                try:
                    fd = os.open(entry.name, _FILE_OPEN_FLAGS, dir_fd=entry.parent_fd)
                except OSError as exc:
                    # ELOOP here means it became a symlink after the scan.
                    raise PackingError(f"{entry.arcname!r}: cannot open: {exc}") from exc
                try:
                    info, st = _file_info(entry, fd)
                    _set_common(info, st)
                    tar.addfile(info, _ExactReader(fd, entry.arcname))
                    after = os.fstat(fd)
                    if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
                        raise PackingError(f"{entry.arcname!r}: changed while being packed")
                finally:
                    os.close(fd)
    finally:
        walker.close()


# --------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------


class _CappedReader:
    """The archive file as tarfile sees it, refusing oversized single reads.

    tarfile reads a PAX header or GNU long name whole, sized by the header
    itself; a hostile archive could ask for gigabytes. Legitimate reads are
    small (see ``_MAX_SINGLE_READ``), so a large one is refused outright.
    """

    def __init__(self, raw: BinaryIO, archive: Path) -> None:
        self._raw = raw
        self._archive = archive

    def read(self, size: int, /) -> bytes:
        if size < 0 or size > _MAX_SINGLE_READ:
            raise PackingError(
                f"{self._archive}: header at offset {self._raw.tell()} asks to read "
                f"{size} bytes at once (corrupt or hostile archive)"
            )
        return self._raw.read(size)

    def write(self, b: bytes, /) -> int:
        raise PackingError(f"{self._archive}: opened read-only")

    def tell(self) -> int:
        return self._raw.tell()

    def seek(self, pos: int, /) -> int:
        return self._raw.seek(pos)

    def close(self) -> None:
        # The caller owns the underlying file and closes it.
        pass


def _member_kind_problem(member: tarfile.TarInfo) -> str | None:
    """Why this member's type is not allowed, or None for file/directory."""
    if member.issym():
        return f"is a symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"is a hard link (to {member.linkname!r})"
    if member.ischr() or member.isblk():
        return "is a device"
    if member.isfifo():
        return "is a FIFO"
    if member.issparse():
        # Never produced by pack_directory; its declared size is not what
        # is stored, which would defeat the truncation check.
        return "is a sparse file"
    if member.isreg() or member.isdir():
        return None
    return f"has unsupported type {member.type!r}"


def _check_member(member: tarfile.TarInfo, seen: set[str]) -> None:
    """Refuse one member whose name or type is unsafe; record its name.

    The name rules are stricter than the data filter's (which strips a
    leading '/' rather than refusing): an archive we produced never has such
    names, so one that does is corrupt or hostile and is refused as a whole.
    """
    name = member.name
    if "\x00" in name:
        raise PackingError(f"member {name!r}: name contains NUL")
    if name.startswith("/") or os.path.isabs(name):
        raise PackingError(f"member {name!r}: absolute name")
    raw_parts = name.split("/")
    if ".." in raw_parts:
        raise PackingError(f"member {name!r}: name contains '..'")
    problem = _member_kind_problem(member)
    if problem is not None:
        raise PackingError(f"member {name!r}: {problem}; only regular files and directories")
    parts = [part for part in raw_parts if part not in ("", ".")]
    if not parts:
        if member.isdir():
            return  # "." or "./": the destination itself, as tar -C src . writes it
        raise PackingError(f"member {name!r}: empty name")
    normal = "/".join(parts)
    if normal in seen:
        raise PackingError(f"member {name!r}: appears more than once")
    seen.add(normal)
    if member.size < 0:
        # A PAX "size" may be negative; tarfile would seek backwards with it,
        # and it would let one member cancel another's size in the bomb check.
        raise PackingError(f"member {name!r}: negative size {member.size}")
    mtime = member.mtime
    if not math.isfinite(mtime) or abs(mtime) >= _MAX_ABS_MTIME:
        raise PackingError(f"member {name!r}: modification time {mtime!r} out of range")


def _check_end(raw: BinaryIO, offset: int, archive: Path) -> None:
    """Require the end-of-archive marker, and nothing but zeros, after the last member.

    tarfile stops silently at a corrupt header or at a truncation that falls
    on a header boundary, which would extract a prefix of the package as if
    it were all of it. Every well-formed tar ends with at least two zero
    blocks (then zero padding); the offset tarfile stopped at must lie before
    them, and inside the file, so this also proves every member's data is
    present.
    """
    raw.seek(offset)
    zeros = 0
    while chunk := raw.read(_CHUNK):
        if chunk.count(0) != len(chunk):
            raise PackingError(f"{archive}: corrupt member header at offset {offset}")
        zeros += len(chunk)
    if zeros < 2 * tarfile.BLOCKSIZE:
        raise PackingError(f"{archive}: truncated (no end-of-archive marker at offset {offset})")


def _scan(tar: tarfile.TarFile, raw: BinaryIO, archive: Path, limits: ExtractLimits) -> None:
    """Look at every member header, refusing the archive before any write."""
    tally = _Tally(limits, str(archive))
    for member in tar:
        tally.admit(member)
    _check_end(raw, tar.offset, archive)


class _Tally:
    """The checks every member header passes, in order, whether the archive
    is scanned whole before extraction or extracted as it streams in: its
    name and type, and the caps on members and on declared file data."""

    def __init__(self, limits: ExtractLimits, name: str) -> None:
        self.limits = limits
        self.name = name
        self.seen: set[str] = set()
        self.count = 0
        self.total = 0

    def admit(self, member: tarfile.TarInfo) -> None:
        self.count += 1
        if self.count > self.limits.max_members:
            raise PackingError(f"{self.name}: more than {self.limits.max_members} members")
        _check_member(member, self.seen)
        if member.isreg():
            self.total += member.size
            if self.total > self.limits.max_total_size:
                raise PackingError(
                    f"member {member.name!r}: archive declares more than "
                    f"{self.limits.max_total_size} bytes of file data"
                )


def _empty_dir(dest: Path) -> None:
    """Remove whatever a failed extraction left, keeping ``dest`` itself."""
    with os.scandir(dest) as it:
        entries = list(it)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


def _require_empty_dir(dest: Path) -> None:
    if not dest.is_dir():
        raise PackingError(f"{dest}: extraction target is not an existing directory")
    with os.scandir(dest) as it:
        if next(it, None) is not None:
            raise PackingError(f"{dest}: extraction target is not empty")


def safe_extract(archive: Path, dest: Path, limits: ExtractLimits = ExtractLimits()) -> None:
    """Extract ``archive`` into ``dest``, which must exist and be empty.

    First every member header is scanned and the whole archive is refused
    (PackingError, nothing written) if any member has an absolute name, a
    '..' component or a NUL, is anything but a regular file or directory
    (symlink, hard link, device, FIFO, sparse file), appears twice, or if the
    archive has more than ``limits.max_members`` members, declares more than
    ``limits.max_total_size`` bytes of file data, is truncated, or cannot be
    read by tarfile at all. Only then are members extracted, through
    ``tarfile.data_filter`` as defence in depth (it also drops ownership and
    setuid bits while keeping the owner-exec bit of regular files).

    Only uncompressed tar is accepted: that is what :func:`pack_directory`
    writes. If extraction fails part-way (disk full, say), ``dest`` is emptied
    again before the error propagates, so callers never see a partial tree.
    """
    _require_empty_dir(dest)
    with archive.open("rb") as raw:
        try:
            with tarfile.open(fileobj=_CappedReader(raw, archive), mode="r:", errorlevel=2) as tar:
                tar.copybufsize = _COPY_BUFFER  # type: ignore[attr-defined]  # not in typeshed
                _scan(tar, raw, archive, limits)
                try:
                    tar.extractall(dest, filter=tarfile.data_filter)
                except BaseException:
                    _empty_dir(dest)
                    raise
        except (tarfile.TarError, ValueError) as exc:
            # ValueError: tarfile lets some malformed header values through
            # (e.g. an undecodable hdrcharset or GNU sparse map).
            raise PackingError(f"{archive}: unreadable or unsafe archive: {exc}") from exc


def safe_extract_stream(
    raw: BinaryIO, dest: Path, name: Path, limits: ExtractLimits = ExtractLimits()
) -> None:
    """Extract the archive read from ``raw`` into the empty ``dest`` member
    by member, as its bytes become readable: what lets extraction overlap a
    download (``raw`` blocks until the next verified bytes are there).

    Each member is checked by the same rules as :func:`safe_extract` before
    it is written (name, type, duplicates, member count, declared total
    size), and the end-of-archive marker is required at the end; what
    cannot be known before the whole archive has been seen (a bad member
    after good ones, a truncation) is found later, so on any failure
    ``dest`` is emptied before the error propagates. Nothing may use
    ``dest`` before this returns. ``name`` names the archive in errors.
    The tree written is the one :func:`safe_extract` writes."""
    _require_empty_dir(dest)
    try:
        with tarfile.open(fileobj=_CappedReader(raw, name), mode="r:", errorlevel=2) as tar:
            tar.copybufsize = _COPY_BUFFER  # type: ignore[attr-defined]  # not in typeshed
            tally = _Tally(limits, str(name))
            dirs: list[tarfile.TarInfo] = []
            for member in tar:
                tally.admit(member)
                # The data filter as extractall applies it; directories get
                # their attributes last, as extractall sets them.
                kept = tarfile.data_filter(member, str(dest))
                if kept.isdir():
                    dirs.append(kept)
                tar.extract(
                    kept, dest, set_attrs=not kept.isdir(), filter=tarfile.fully_trusted_filter
                )
            _check_end(raw, tar.offset, name)
            for kept in sorted(dirs, key=lambda d: d.name, reverse=True):
                path = os.path.join(dest, kept.name)
                tar.chmod(kept, path)
                tar.utime(kept, path)
    except (tarfile.TarError, ValueError) as exc:
        _empty_dir(dest)
        raise PackingError(f"{name}: unreadable or unsafe archive: {exc}") from exc
    except BaseException:
        _empty_dir(dest)
        raise
