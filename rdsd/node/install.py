"""Running a package's install command, after verification only.

The command is an argument list (no shell unless the package's command calls
one), runs in the freshly extracted package directory with the RDSD_*
variables set, and is killed with its whole process group if it outlives the
timeout. Its output goes to a log file beside the extraction, and the last
line of it becomes the failure detail an operator sees in ``job status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

from ..errors import PackingError
from ..packages.manifest import Manifest
from ..packages.packing import safe_extract


@dataclass(frozen=True)
class InstallResult:
    ok: bool
    detail: str


def _last_line(log_path: Path) -> str:
    try:
        with log_path.open("rb") as f:
            f.seek(max(0, log_path.stat().st_size - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


async def install(
    archive: Path,
    manifest: Manifest,
    workdir: Path,
    node: str,
    job: str,
    timeout: float,
) -> InstallResult:
    """Extract ``archive`` and run the install command; never raises for a
    failure of the package itself, only reports it."""
    target = workdir / f"{job}-{manifest.id}"
    log_path = workdir / f"{job}-{manifest.id}.log"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    loop = asyncio.get_running_loop()
    try:
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
    with log_path.open("wb") as out:
        try:
            proc = await asyncio.create_subprocess_exec(
                *manifest.install,
                cwd=target,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            return InstallResult(False, f"install command could not start: {exc}")
        try:
            async with asyncio.timeout(timeout):
                code = await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            return InstallResult(False, f"install command timed out after {timeout:.0f}s")
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
    if code != 0:
        tail = _last_line(log_path)
        return InstallResult(
            False, f"install command exited with {code}" + (f": {tail}" if tail else "")
        )
    return InstallResult(True, "")
