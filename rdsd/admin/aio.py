"""The admin API for asyncio programs: ``Admin``'s operations, awaited.

``Admin`` is synchronous: every call is SQLite and file work, and a write
waits (up to the database's busy timeout, 10 s) while another connection
holds the write lock, which would freeze an event loop for as long. Here
each call runs on one thread owned by the ``AsyncAdmin``: that thread opens
the ``Admin`` (sqlite3 connections belong to the thread that made them) and
runs the calls one after another, in the order they were awaited. The
event loop only waits on a future, so its other tasks keep running however
long the database is busy. Measured on a 2-core test machine: the hop adds
about 0.15 ms to a call (a status read, 0.03 ms alone; a job creation, about
2 ms either way, is dominated by its durable commit); with another
connection holding the write lock for a second, the loop's worst lag stayed
under 5 ms and the write went through about 30 ms after the lock was freed
(SQLite's busy handler retries in steps), where the synchronous ``Admin``
would have stalled the loop for the whole second.

The methods wrap ``Admin``'s one for one, so validation and errors are the
command line's own: a refused request raises ``AdminError`` (a
``UserError``) with the same one-line message ``rdsd`` prints.

Which calls are safe where:

- An ``AsyncAdmin`` belongs to the event loop it was entered on; await its
  methods from any task of that loop, concurrently if you like (they queue
  on its thread). Do not share one between loops or threads; open one per
  loop.
- Cancelling an awaited call does not undo it: work already handed to the
  thread runs to its end (a job may still be created) and only the result
  is dropped.
- Attached to a running node (``node=``), its changes are published on that
  node's bus like the node's own, and the node is woken at once instead of
  at its next poll.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from ..config import DEFAULT_KEEP, NodeConfig
from ..domain import JobPace, JobType, Role
from ..events import Event
from ..node import Node
from . import setup
from .ops import Admin, PackageInfo

T = TypeVar("T")


class AsyncAdmin:
    """``async with AsyncAdmin(home) as admin:`` then ``await admin.create_job(...)``.

    ``node``, if given, is the running node of the same home: the admin's
    changes then appear on ``node.events()`` (job created, cancelled,
    retried) and wake the node right away.
    """

    def __init__(self, home: Path, *, node: Node | None = None) -> None:
        if node is not None and node.cfg.home.resolve() != Path(home).resolve():
            raise ValueError(f"node {node.cfg.name} runs {node.cfg.home}, not {home}")
        self.home = Path(home)
        self.node = node
        self._admin: Admin | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- life cycle ----------------------------------------------------------------

    async def __aenter__(self) -> AsyncAdmin:
        await self.open()
        return self

    async def __aexit__(
        self,
        et: type[BaseException] | None,
        e: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Start the admin thread and open the home's database on it."""
        if self._pool is not None:
            raise RuntimeError("this AsyncAdmin is already open")
        self._loop = asyncio.get_running_loop()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rdsd-admin")
        try:
            self._admin = await self._hop(self._open)
        except BaseException:
            self._pool.shutdown(wait=False)
            self._pool = None
            raise

    def _open(self) -> Admin:
        admin = Admin(self.home)
        if self.node is not None:
            admin.db.listen(admin.cfg.name, self._from_thread)
        return admin

    async def close(self) -> None:
        """Close the database on its thread (after the calls already queued)
        and let the thread end. Idempotent."""
        pool, admin = self._pool, self._admin
        self._admin = None
        if pool is None:
            return
        try:
            if admin is not None:
                await self._hop(admin.close)
        finally:
            self._pool = None
            pool.shutdown(wait=False)

    async def _hop(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        assert self._pool is not None and self._loop is not None
        return await self._loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def _from_thread(self, event: Event) -> None:
        """The admin thread committed a change: publish it on the node's loop.
        Queued right after the commit, so it keeps its place among changes
        the node makes itself."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._deliver, event)

    def _deliver(self, event: Event) -> None:
        node = self.node
        if node is not None:
            node.bus.publish(event)
            node.wake()

    @property
    def cfg(self) -> NodeConfig:
        """The home's configuration (read when the admin was opened)."""
        return self._require().cfg

    def _require(self) -> Admin:
        if self._admin is None:
            raise RuntimeError("AsyncAdmin is not open: use 'async with AsyncAdmin(home)'")
        return self._admin

    async def run(self, fn: Callable[[Admin], T]) -> T:
        """Run ``fn(admin)`` on the admin thread: any ``Admin`` operation not
        wrapped here, still off the event loop."""
        return await self._hop(fn, self._require())

    # -- packages ---------------------------------------------------------------------

    async def add_package(
        self,
        src: Path,
        name: str,
        version: str,
        install: str | None = None,
        keep: int = DEFAULT_KEEP,
    ) -> str:
        """Pack ``src`` into the storehouse as ``NAME-VERSION`` (server only);
        returns the package id."""
        return await self._hop(self._require().add_package, src, name, version, install, keep)

    async def packages(self) -> list[PackageInfo]:
        return await self._hop(self._require().packages)

    async def keep_package(self, pid: str, keep: int) -> PackageInfo:
        """Re-sign ``pid`` with a new keep duration in seconds (server only)."""
        return await self._hop(self._require().keep_package, pid, keep)

    async def cache(self) -> list[dict[str, Any]]:
        """What a relay's cache holds (relay only)."""
        return await self._hop(self._require().cache)

    # -- jobs ---------------------------------------------------------------------------

    async def create_job(
        self,
        type_: JobType | str,
        package: str,
        to: list[str],
        at: float | None = None,
        pace: JobPace | None = None,
    ) -> str:
        """Create a job for nodes and ``group:NAME`` destinations; returns its
        id. ``pace``: the job's own rate and windows (``--rate``, ``--window``)."""
        return await self._hop(self._require().create_job, type_, package, to, at, pace=pace)

    async def job_status(self, jid: str) -> dict[str, Any]:
        return await self._hop(self._require().job_status, jid)

    async def jobs(self) -> list[dict[str, Any]]:
        return await self._hop(self._require().jobs)

    async def retry(self, jid: str) -> list[str]:
        """Run the failed destinations of a job again; returns them."""
        return await self._hop(self._require().retry, jid)

    async def cancel(self, jid: str) -> list[str]:
        """Cancel what has not finished; returns the destinations cancelled."""
        return await self._hop(self._require().cancel, jid)

    # -- nodes and groups -----------------------------------------------------------------

    async def nodes(self) -> list[dict[str, Any]]:
        return await self._hop(self._require().nodes)

    async def add_group(self, name: str, members: list[str]) -> None:
        await self._hop(self._require().add_group, name, members)

    async def revoke(self, name: str) -> None:
        await self._hop(self._require().revoke, name)

    async def enroll(self, name: str, role: Role | str, out: Path) -> None:
        """Issue ``name``'s bundle to ``out`` and record the node (server only)."""
        self._require()
        await self._hop(setup.enroll, self.home, name, role, out)

    # The setup helpers, reachable from the one import an embedder needs.
    @staticmethod
    async def init_server(
        home: Path, name: str = "server", listen: tuple[str, int] = ("0.0.0.0", 7700)
    ) -> NodeConfig:
        """Make a deployment's server home (see ``init_server`` below)."""
        return await init_server(home, name, listen)

    @staticmethod
    async def init_node(
        home: Path,
        role: Role,
        bundle_path: Path,
        parent: tuple[str, int],
        listen: tuple[str, int] | None = None,
    ) -> NodeConfig:
        """Make a relay or client home from its bundle (see ``init_node`` below)."""
        return await init_node(home, role, bundle_path, parent, listen)


# -- setting homes up -------------------------------------------------------------------


async def init_server(
    home: Path, name: str = "server", listen: tuple[str, int] = ("0.0.0.0", 7700)
) -> NodeConfig:
    """``rdsd.admin.init_server`` off the event loop (key generation and
    durable writes: tens of milliseconds)."""
    return await asyncio.to_thread(setup.init_server, home, name, listen)


async def init_node(
    home: Path,
    role: Role,
    bundle_path: Path,
    parent: tuple[str, int],
    listen: tuple[str, int] | None = None,
) -> NodeConfig:
    """``rdsd.admin.init_node`` off the event loop."""
    return await asyncio.to_thread(setup.init_node, home, role, bundle_path, parent, listen)


__all__ = ["AsyncAdmin", "init_node", "init_server"]
