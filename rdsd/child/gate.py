"""When this node may take package data from its parent, and how fast.

The node's ``[limits] download_rate`` and ``[windows] transfer``/``install``
live here, changeable while the node runs (``update`` on a reload), together
with what the job database says of the jobs a package is for (their rate
and windows). The fetcher asks three things: the rate to ask its parent for
(FETCH carries it: the parent paces the data, so the session's reader never
stalls and control messages never queue behind data), whether to wait before
an attempt, and, after each chunk, whether a window has closed. The runner
asks whether an install may start.

What is held, and until when, is kept per package (``held``) for status:
``waiting for window 22:00 (transfer, opens ...)``. Every decision takes
``now`` from an injectable clock, so tests decide with a fake one.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence

import structlog

from ..config import NodeConfig
from ..domain import JobPace, Window
from ..errors import WindowClosed
from ..net.pace import lowest_rate
from ..util.windows import describe_hold, opens_at

log = structlog.get_logger("rdsd.gate")

#: What a relay's FETCH_FAIL reason holds when its own transfer window
#: keeps it from fetching the package (``describe_hold`` starts so).
HELD_MARK = "waiting for window"

#: The longest one wait for a window sleeps before deciding again, so a
#: clock set forward or a changed time zone is noticed within a minute.
RECHECK = 60.0


class TransferGate:
    """The node's live limits and windows, and what each package waits for.

    ``jobs(package)`` gives the paces of this node's own unfinished jobs for
    the package (their windows bind its fetch) and ``package_rate(package)``
    the tightest rate of any unfinished job for it here (a relay fetching
    for a child keeps to the child's job's rate too)."""

    def __init__(
        self,
        cfg: NodeConfig,
        jobs: Callable[[str], Sequence[JobPace]] = lambda package: (),
        package_rate: Callable[[str], float] = lambda package: 0.0,
        clock: Callable[[], float] = time.time,
        waits: bool = True,
    ) -> None:
        self.name = cfg.name
        self.download_rate = cfg.download_rate
        self.transfer_windows: tuple[Window, ...] = cfg.transfer_windows
        self.install_windows: tuple[Window, ...] = cfg.install_windows
        self.jobs = jobs
        self.package_rate = package_rate
        self.clock = clock
        # False in a one-shot command: raise WindowClosed instead of waiting.
        self.waits = waits
        self._held: dict[str, str] = {}
        self._changed = asyncio.Event()
        # Grows with each reload, so a running fetch notices a new rate.
        self.version = 0

    # -- changes ----------------------------------------------------------------

    def update(self, cfg: NodeConfig) -> None:
        """Take new limits and windows (a reload) and wake every waiter to
        decide again; running fetches ask the new rate on their next attempt."""
        self.download_rate = cfg.download_rate
        self.transfer_windows = cfg.transfer_windows
        self.install_windows = cfg.install_windows
        self.version += 1
        self.notify()

    def notify(self) -> None:
        """Something a decision depends on changed: wake the waiters."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self, timeout: float) -> None:
        """Wait for the next change, or ``timeout`` seconds."""
        event = self._changed
        try:
            async with asyncio.timeout(max(timeout, 0.0)):
                await event.wait()
        except TimeoutError:
            pass

    # -- transfers ----------------------------------------------------------------

    def rate(self, package: str) -> float:
        """What to ask the parent for: the tightest of this node's download
        limit and the rates of the jobs the package is for (0: none)."""
        return lowest_rate(self.download_rate, self.package_rate(package))

    def _transfer_sets(self, package: str) -> list[Sequence[Window]]:
        return [self.transfer_windows, *(p.windows for p in self.jobs(package))]

    def transfer_opens(self, package: str, now: float) -> float:
        """When ``package`` may be fetched: ``now`` if at once, else the
        epoch second the windows open (``math.inf``: never)."""
        return opens_at(self._transfer_sets(package), now)

    def paused(self, package: str) -> bool:
        """Has a window closed on a running fetch of ``package``?"""
        now = self.clock()
        return self.transfer_opens(package, now) > now

    def pause_check(self, package: str, resumes: bool) -> Callable[[], bool]:
        """What a running fetch asks after each chunk: pause now? Yes when a
        window closed; and, on a hop that resumes (not a client under a
        relay, which would start over), when a reload changed the rate this
        fetch asked for, so the next FETCH asks the new one."""
        asked, version = self.rate(package), self.version

        def check() -> bool:
            nonlocal version
            if self.paused(package):
                return True
            if resumes and self.version != version:
                version = self.version
                return self.rate(package) != asked
            return False

        return check

    async def wait_transfer(self, package: str) -> None:
        """Return once ``package`` may be fetched; while it may not, say so
        in ``held``."""
        while True:
            now = self.clock()
            at = self.transfer_opens(package, now)
            if at <= now:
                if self._held.pop(package, None) is not None:
                    log.info("transfer.window_open", node=self.name, package=package)
                    self.notify()
                return
            detail = describe_hold("transfer", at)
            if not self.waits:
                raise WindowClosed(detail)
            if self._held.get(package) != detail:
                self._held[package] = detail
                log.info("transfer.held", node=self.name, package=package, detail=detail)
                self.notify()
            await self.changed(min(at - now, RECHECK) if math.isfinite(at) else RECHECK)

    def held_upstream(self, package: str, reason: str) -> bool:
        """Is ``reason`` (a failed attempt) the parent holding the package
        for its own transfer window? Then it is held, not failed: status
        says so until the next attempt."""
        if HELD_MARK not in reason:
            return False
        self._held[package] = reason.split("refused: ", 1)[-1]
        self.notify()
        return True

    def held(self, package: str) -> str | None:
        """Why a fetch of ``package`` waits now, or None if it does not."""
        return self._held.get(package)

    def forget(self, package: str) -> None:
        """The fetch of ``package`` ended: nothing is held for it."""
        self._held.pop(package, None)

    # -- installs ---------------------------------------------------------------------

    def install_opens(self, pace: JobPace, now: float) -> float:
        """When a job with ``pace`` may run its install command."""
        return opens_at([self.install_windows, pace.windows], now)
