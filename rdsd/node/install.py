"""Running a package's install command as an action with a durable record.

The command is an argument list (no shell unless the package's command calls
one), runs in the freshly extracted package directory with the RDSD_*
variables set. It does not run as the daemon's child directly: a small
supervisor (``supervise.py``, in a session of its own) runs it, waits for it
and writes its exit status atomically next to its log, so the outcome is on
disk even when the daemon dies (kill -9) while the command runs.

Per job, in the node's ``work/`` directory:

- ``JOB.run`` — the record, written before the supervisor starts (intent:
  job, node, package, generation, paths) and again once it runs (its pid
  and its start time from ``/proc/PID/stat``, so a reused pid is never
  mistaken for it);
- ``JOB.run.lock`` — locked before the supervisor starts and inherited by
  it: the kernel holds the lock exactly as long as the supervisor lives, so
  a lock that cannot be taken means a run of this job is still going, and a
  new run never starts beside it;
- ``JOB-PACKAGE.exit`` — the outcome, written by the supervisor;
- ``JOB-PACKAGE.log`` — the command's output (the last ``KEEP_LOGS`` are kept).

``settle`` finds out what became of an earlier run: still running → wait for
it (a pidfd, not a sleep loop) and take its result; finished → its real exit
status; never started → ``None``, and the caller runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

from ..errors import PackingError
from ..packages.download import Download
from ..packages.manifest import Manifest
from ..packages.packing import safe_extract, safe_extract_stream
from ..packages.store import Store
from ..util.fsutil import atomic_write, try_lock

log = structlog.get_logger("rdsd.install")
SUPERVISOR = Path(__file__).with_name("supervise.py")
KEEP_LOGS = 50  # install logs kept per node, newest first
STOP_GRACE = 10.0  # seconds a stopped supervisor has to record the outcome
INTERRUPTED = "interrupted: the node stopped during the install"
LOST = "interrupted: the install's supervisor ended without recording a result"


@dataclass(frozen=True)
class InstallResult:
    ok: bool
    detail: str


@dataclass(frozen=True)
class RunRecord:
    """What the node knows about one run of one job's install command."""

    job: str
    node: str
    package: str
    generation: int
    target: str
    log: str
    exit: str
    pid: int | None = None
    start_time: int | None = None

    @staticmethod
    def path(workdir: Path, job: str) -> Path:
        return workdir / f"{job}.run"

    @classmethod
    def load(cls, workdir: Path, job: str) -> RunRecord | None:
        try:
            raw = json.loads(cls.path(workdir, job).read_bytes())
            return cls(**raw)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            log.warning("install.record_unreadable", job=job, reason=str(exc))
            return None

    def save(self, workdir: Path) -> None:
        atomic_write(self.path(workdir, self.job), json.dumps(asdict(self)).encode())


def lock_path(workdir: Path, job: str) -> Path:
    return workdir / f"{job}.run.lock"


def package_lock_path(workdir: Path, package: str) -> Path:
    return workdir / f"{package}.install.lock"


@contextlib.asynccontextmanager
async def _package_lock(workdir: Path, node: str, job: str, package: str) -> AsyncIterator[int]:
    """Wait until no other process installs ``package`` on this node; yields
    the locked descriptor, for the supervisor to inherit.

    The daemon and ``rdsft install`` are separate processes with a runner
    each; the runner orders installs of one package within its process, this
    lock orders them across processes. The supervisor inherits it, so it is
    held exactly as long as the install command may run, across a daemon
    restart too. Waiting happens in a thread (``flock`` blocks); if this is
    cancelled meanwhile, the descriptor is closed and the lock, once the
    thread gets it, goes with the last reference."""
    fd = os.open(package_lock_path(workdir, package), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if not try_lock(fd):
            log.info("install.waiting_for_package", node=node, job=job, package=package)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, lambda: try_lock(fd, wait=True))
        yield fd
    finally:
        os.close(fd)  # a supervisor that was started holds it from here on


def proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of
    ``/proc/PID/stat``), or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    return int(fields[19])


async def wait_exit(pid: int, start_time: int | None) -> None:
    """Wait for process ``pid`` to end, woken by its pidfd becoming readable.
    Returns at once if the process is gone or the pid now names another one."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        # Checked after the pidfd pins the process: no reuse can slip in.
        if start_time is not None and proc_start_time(pid) != start_time:
            return
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not ended.done():
                ended.set_result(None)

        loop.add_reader(fd, readable)
        try:
            await ended
        finally:
            loop.remove_reader(fd)
    finally:
        os.close(fd)


def signal_process(pid: int, start_time: int | None, sig: int) -> None:
    """Send ``sig`` to ``pid`` only if it is still the process that started
    at ``start_time`` (through a pidfd: no reuse can slip in between)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if start_time is None or proc_start_time(pid) == start_time:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, sig)
    finally:
        os.close(fd)


def read_outcome(path: Path) -> InstallResult | None:
    """The supervisor's exit file as a result, or None if it is not there."""
    try:
        raw: dict[str, Any] = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:
        return InstallResult(False, f"unreadable install outcome in {path}")
    log_path = path.with_suffix(".log")
    if "error" in raw:
        return InstallResult(False, str(raw["error"]))
    if "timeout" in raw:
        return InstallResult(False, f"install command timed out after {float(raw['timeout']):.0f}s")
    if "stopped" in raw:
        return InstallResult(False, INTERRUPTED)
    code = int(raw.get("code", -1))
    if code != 0:
        tail = _last_line(log_path)
        return InstallResult(
            False, f"install command exited with {code}" + (f": {tail}" if tail else "")
        )
    return InstallResult(True, "")


def _last_line(log_path: Path) -> str:
    try:
        with log_path.open("rb") as f:
            f.seek(max(0, log_path.stat().st_size - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


@dataclass(frozen=True)
class Settled:
    """What an earlier run of a job came to (``result``), and for which
    generation of the destination it ran."""

    generation: int
    result: InstallResult


async def settle(
    workdir: Path, job: str, stopping: Callable[[], bool] = lambda: False
) -> Settled | None:
    """Find out what became of the last run of ``job``'s install command,
    waiting for it if it still runs. None: it never started. Cancelled while
    waiting because the node stops (``stopping()``), it stops the run as it
    would one it started itself."""
    rec = RunRecord.load(workdir, job)
    if rec is None:
        return None
    exit_path = Path(rec.exit)
    if (done := read_outcome(exit_path)) is not None:
        return Settled(rec.generation, done)
    fd = os.open(lock_path(workdir, job), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if try_lock(fd):
            # No supervisor holds the run lock: it ended, or never started.
            if (done := read_outcome(exit_path)) is not None:
                return Settled(rec.generation, done)
            if rec.pid is None:
                return None
            return Settled(rec.generation, InstallResult(False, LOST))
        log.info("install.adopted", job=job, package=rec.package, pid=rec.pid)
        if rec.pid is not None and proc_start_time(rec.pid) == rec.start_time:
            try:
                await wait_exit(rec.pid, rec.start_time)
            except asyncio.CancelledError:
                if stopping():
                    signal_process(rec.pid, rec.start_time, signal.SIGTERM)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(STOP_GRACE):
                            await asyncio.shield(wait_exit(rec.pid, rec.start_time))
                raise
        else:
            # Started but its pid not yet recorded: the lock ends with it.
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, lambda: try_lock(fd, wait=True))
    finally:
        os.close(fd)
    done = read_outcome(exit_path)
    return Settled(rec.generation, done if done is not None else InstallResult(False, LOST))


def _start_supervisor(
    command: tuple[str, ...],
    target: Path,
    log_path: Path,
    exit_path: Path,
    timeout: float,
    lock_fds: tuple[int, ...],
    env: dict[str, str],
) -> subprocess.Popen[bytes]:
    """Start ``supervise.py`` in a session of its own (it must outlive the
    daemon), holding the run and package locks through the inherited
    ``lock_fds``."""
    return subprocess.Popen(
        [
            sys.executable,
            "-I",  # isolated: the standard library only, nothing from the environment
            str(SUPERVISOR),
            "--cwd",
            str(target),
            "--log",
            str(log_path),
            "--exit",
            str(exit_path),
            "--timeout",
            str(timeout),
            *(arg for fd in lock_fds for arg in ("--lock-fd", str(fd))),
            "--",
            *command,
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=lock_fds,
        start_new_session=True,
    )


def forget(workdir: Path, job: str) -> None:
    """The outcome is recorded in the job database: drop the run's traces
    but its log (and keep only the newest ``KEEP_LOGS`` logs)."""
    rec = RunRecord.load(workdir, job)
    if rec is not None:
        if Path(rec.exit).exists():  # the command ran: its directory has done its work
            shutil.rmtree(rec.target, ignore_errors=True)
        Path(rec.exit).unlink(missing_ok=True)
    RunRecord.path(workdir, job).unlink(missing_ok=True)
    lock_path(workdir, job).unlink(missing_ok=True)
    logs = []
    for path in workdir.glob("*.log"):
        with contextlib.suppress(FileNotFoundError):  # another process pruned it
            logs.append((path.stat().st_mtime, path))
    logs.sort(reverse=True)
    for _, old in logs[KEEP_LOGS:]:
        old.unlink(missing_ok=True)


class _Stopped(Exception):
    """The overlapped extraction was told to stop."""


class _Following(io.RawIOBase):
    """A download's file as far as it is verified: a read waits until the
    bytes it wants have matched their signed digests, and fails if the
    download ends without them. Only verified bytes are ever read."""

    def __init__(self, dl: Download, stopped: Callable[[], bool]) -> None:
        super().__init__()
        self._dl = dl
        self._size = dl.manifest.size
        self._stopped = stopped
        self._fd = os.open(dl.path, os.O_RDONLY)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        want = min(len(view), self._size - self._pos)
        if want <= 0:
            return 0
        dl = self._dl
        while dl.verified <= self._pos:
            if self._stopped():
                raise _Stopped()
            if dl.error is not None:
                raise OSError(f"the download ended: {dl.error}")
            dl.wait_verified(self._pos, 0.5)
        n = os.preadv(self._fd, [view[: min(want, dl.verified - self._pos)]], self._pos)
        self._pos += n
        return n

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().close()


class EarlyExtract:
    """Extraction overlapped with the download: verified chunks stream into
    the extractor (in a thread of its own) while later ones arrive, into a
    staging directory beside the install's. The install takes the tree only
    if the whole archive was extracted and checked; otherwise (a bad archive,
    a download that failed and was retried) it extracts as usual. A chunk
    that does not match its digest is never written as verified, so it
    never reaches the extractor, and nothing runs before the last byte."""

    def __init__(self, dl: Download, staging: Path, node: str, job: str) -> None:
        self.staging = staging
        self._dl = dl
        self._node = node
        self._job = job
        self._stop = False
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"rdsd-extract-{job}")
        self._fut = asyncio.get_running_loop().run_in_executor(self._pool, self._run)
        self._fut.add_done_callback(lambda f: f.cancelled() or f.exception())

    @classmethod
    def start(
        cls, store: Store, manifest: Manifest, workdir: Path, node: str, job: str
    ) -> EarlyExtract | None:
        """Begin extracting ``manifest``'s running download, if there is one."""
        dl = store.active(manifest.id)
        if dl is None or dl.error is not None:
            return None
        staging = workdir / f"{job}-{manifest.id}.early"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        log.info("extract.early", node=node, job=job, package=manifest.id)
        return cls(dl, staging, node, job)

    def _run(self) -> None:
        follow = _Following(self._dl, lambda: self._stop)
        with io.BufferedReader(follow, buffer_size=1024 * 1024) as raw:
            safe_extract_stream(raw, self.staging, self._dl.path)

    async def result(self) -> bool:
        """Wait for the extraction: True if the whole tree is in ``staging``."""
        try:
            await asyncio.shield(self._fut)
        except (PackingError, OSError, _Stopped) as exc:
            log.info(
                "extract.early_abandoned",
                node=self._node,
                job=self._job,
                package=self._dl.manifest.id,
                reason=str(exc) or type(exc).__name__,
            )
            return False
        return True

    async def discard(self) -> None:
        """Stop it (if running) and remove what it wrote."""
        self._stop = True
        with contextlib.suppress(Exception):
            await asyncio.shield(self._fut)
        self._pool.shutdown(wait=False)
        shutil.rmtree(self.staging, ignore_errors=True)


async def install(
    archive: Path,
    manifest: Manifest,
    workdir: Path,
    node: str,
    job: str,
    timeout: float,
    generation: int = 0,
    early: EarlyExtract | None = None,
) -> InstallResult:
    """Extract ``archive`` (or take the tree ``early`` extracted while it
    downloaded) and run the install command under a supervisor; never
    raises for a failure of the package itself, only reports it. If
    cancelled, the command is stopped and its outcome recorded on disk
    before the cancellation goes on (``read_outcome`` tells the caller)."""
    target = workdir / f"{job}-{manifest.id}"
    log_path = workdir / f"{job}-{manifest.id}.log"
    exit_path = workdir / f"{job}-{manifest.id}.exit"
    if target.exists():
        shutil.rmtree(target)
    extracted = early is not None and await early.result()
    if early is not None and extracted:
        os.replace(early.staging, target)  # whole and checked
    else:
        if early is not None:
            await early.discard()
        target.mkdir(parents=True)
    loop = asyncio.get_running_loop()
    try:
        if not extracted:
            await loop.run_in_executor(None, safe_extract, archive, target)
    except PackingError as exc:
        shutil.rmtree(target, ignore_errors=True)
        return InstallResult(False, f"archive refused: {exc}")
    except OSError as exc:
        shutil.rmtree(target, ignore_errors=True)
        return InstallResult(False, f"extraction failed: {exc}")
    if not manifest.install:
        return InstallResult(True, f"extracted to {target} (no install command)")
    env = dict(os.environ)
    env.update(
        RDSD_NODE=node,
        RDSD_PACKAGE=manifest.name,
        RDSD_VERSION=manifest.version,
        RDSD_JOB=job,
        RDSD_PACKAGE_DIR=str(target),
    )
    # Extracted beside any other install of the package; the command waits
    # for its turn.
    async with _package_lock(workdir, node, job, manifest.id) as package_fd:
        exit_path.unlink(missing_ok=True)
        log_path.write_bytes(b"")
        rec = RunRecord(
            job, node, manifest.id, generation, str(target), str(log_path), str(exit_path)
        )
        rec.save(workdir)  # intent: from here a restart looks for this run
        lock_fd = os.open(lock_path(workdir, job), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if not try_lock(lock_fd):
                return InstallResult(False, "an earlier run of this install is still going")
            locks = (lock_fd, package_fd)
            try:
                proc = _start_supervisor(
                    manifest.install, target, log_path, exit_path, timeout, locks, env
                )
            except OSError as exc:
                return InstallResult(False, f"install supervisor could not start: {exc}")
        finally:
            os.close(lock_fd)  # the supervisor holds the lock from here on
    rec = RunRecord(**{**asdict(rec), "pid": proc.pid, "start_time": proc_start_time(proc.pid)})
    rec.save(workdir)
    log.info("install.started", node=node, job=job, package=manifest.id, pid=proc.pid)
    try:
        await wait_exit(proc.pid, None)
    except asyncio.CancelledError:
        # Stopped with the node or cancelled: the supervisor kills the command
        # and records that (or the real status, had it just ended).
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_GRACE):
                await asyncio.shield(wait_exit(proc.pid, None))
        raise
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(0)  # reap it
    done = read_outcome(exit_path)
    return done if done is not None else InstallResult(False, LOST)
