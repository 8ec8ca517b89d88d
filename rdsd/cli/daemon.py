"""``rdsd run``: the daemon process around a Node.

Process tuning lives here and nowhere else: the open-file limit (a relay
holds one socket per child), glibc's mmap threshold (idle sessions' memory),
the umask and the check of the home's modes (private state), the pid file
(one daemon per home, by lock) and uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import json
import os
import resource
import signal
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from ..config import NodeConfig, default_home
from ..errors import AdminError, ConfigError
from ..util.fsutil import loose_modes, try_lock
from ..util.logs import configure
from .output import PRIVATE_UMASK

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
log = structlog.get_logger("rdsd.daemon")


def _raise_fd_limit() -> None:
    """A relay holds one socket per child: allow as many as the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _pin_mmap_threshold() -> None:
    """Keep large buffers (each TLS connection's 256 KiB read buffer under
    uvloop) in their own lazily-touched mappings. glibc otherwise raises the
    threshold after the first free, and those buffers then land on reused,
    already-touched heap: measured 117 KiB per idle child session against
    44 KiB with the threshold pinned. Best effort; glibc only."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)


def check_modes(cfg: NodeConfig) -> list[tuple[Path, int]]:
    """Warn once, at start, about anything in the home that group or others
    may read or enter (a home copied with ``cp -r``, a package manager's
    0755 directory): the job database and packages are private. Only
    warned: the operator decides, the daemon does not chmod behind them."""
    loose = loose_modes(cfg.home)
    if loose:
        structlog.get_logger("rdsd.daemon").warning(
            "home.permissions_loose",
            node=cfg.name,
            home=str(cfg.home),
            count=len(loose),
            paths=[f"{path} {mode:04o}" for path, mode in loose[:20]],
            fix=f"chmod -R go-rwx {cfg.home}",
        )
    return loose


def run_config(args: argparse.Namespace) -> NodeConfig:
    """The home's configuration with ``--log-format``/``--log-level``, where
    given, over ``[log]`` of its ``rdsd.toml`` for this run."""
    home = (Path(args.home) if args.home else default_home()).resolve()
    flags = {"log_format": args.log_format, "log_level": args.log_level}
    return NodeConfig.load(home, **{k: v for k, v in flags.items() if v is not None})


def cmd_run(args: argparse.Namespace) -> int:
    cfg = run_config(args)
    configure(cfg.log_format, cfg.log_level)
    os.umask(PRIVATE_UMASK)  # run_cli set it too; a daemon must not depend on that
    check_modes(cfg)
    _raise_fd_limit()
    _pin_mmap_threshold()
    pidfile = cfg.paths.pidfile
    fd = os.open(pidfile, os.O_RDWR | os.O_CREAT, 0o600)
    if not try_lock(fd):
        os.close(fd)
        raise AdminError(f"a daemon is already running on {cfg.home}")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        _run_loop(_serve(cfg, banner=cfg.log_format == "console", reread=lambda: run_config(args)))
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)
    return 0


async def _serve(
    cfg: NodeConfig, banner: bool = True, reread: Callable[[], NodeConfig] | None = None
) -> None:
    """Run the node until SIGTERM or SIGINT, saying on stdout once it runs:
    a line of text with console logs, one JSON object with JSON logs (so
    everything the daemon writes is JSON). SIGHUP reads ``rdsd.toml`` again
    (``reread``) and takes its limits and windows; a file that does not
    load is logged and changes nothing. SIGUSR1 (``admin.ops.nudge_daemon``)
    says the job database changed."""
    from ..node import Node

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Node(cfg) as node:
        freeze_startup()
        loop.add_signal_handler(signal.SIGHUP, _reloader(node, reread))
        # rdsd job create/retry/cancel on this home: act now, not at the next poll.
        loop.add_signal_handler(signal.SIGUSR1, node.wake)
        address = None
        if node.downlinks is not None:
            host, port = node.address
            address = f"{host}:{port}"
        if address is not None:
            text = f"rdsd {cfg.role} {cfg.name} listening on {address}"
        else:
            text = f"rdsd client {cfg.name} running"
        if banner:
            print(text, flush=True)
        else:
            print(json.dumps(ready_event(cfg, address, text)), flush=True)
        await stop.wait()


def freeze_startup() -> int:
    """Move what exists once the node has started (the imported modules, the
    node's own structure, about 40,000 objects: all of it lives as long as
    the process) out of the cyclic collector's sight, so a full collection
    walks only what came since: a relay with a thousand children walks
    ~63,000 objects instead of ~103,000, in a pause that stops its loop.
    Only the daemon does this; an embedder's process is its own to tune.
    Returns how many objects are frozen."""
    gc.freeze()
    return gc.get_freeze_count()


def _reloader(node: Any, reread: Callable[[], NodeConfig] | None) -> Callable[[], None]:
    """The SIGHUP handler: reload the node from its home's rdsd.toml."""

    def reload() -> None:
        try:
            node.reload(reread() if reread is not None else None)
        except ConfigError as exc:
            log.error("node.reload_refused", node=node.cfg.name, reason=str(exc))

    return reload


def ready_event(cfg: NodeConfig, address: str | None, text: str) -> dict[str, Any]:
    """The start banner as one JSON object, shaped like the log's events.
    ``message`` is the console banner's sentence, last, so a tool that looks
    for "listening on HOST:PORT" finds it in either format."""
    return {
        "event": "daemon.ready",
        "level": "info",
        "timestamp": datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "node": cfg.name,
        "role": str(cfg.role),
        "address": address,
        "message": text,
    }


def _run_loop(coro: Any) -> None:
    """The daemon prefers uvloop where it is installed; embedders choose."""
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)
