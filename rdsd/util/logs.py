"""Structured logs: one event per meaningful step, with node, job and
package fields, rendered for a console or as JSON lines for collectors."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from importlib.abc import Loader
    from importlib.machinery import ModuleSpec

    import structlog


def configure(fmt: str = "console", level: str = "info") -> None:
    """Set up structlog for a process that runs rdsd (the CLI calls this;
    embedders keep their own configuration)."""
    import logging

    import structlog

    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def configure_on_import(fmt: str = "console", level: str = "info") -> None:
    """``configure`` as soon as anything imports structlog, or now if
    something already has.

    For a command that is over in a moment: importing structlog imports
    ``rich`` (its tracebacks), a sixth of what a listing such as ``rdsd job
    status`` cost, and a listing never logs. A command that does reach
    code which logs (adding a package, ``rdsft -a``) imports structlog on
    the way and finds it configured before its first event, so what it
    logs still goes to stderr at ``level``, never to stdout."""
    for finder in [f for f in sys.meta_path if isinstance(f, _AfterImport)]:
        sys.meta_path.remove(finder)
    if "structlog" in sys.modules:
        configure(fmt, level)
    else:
        sys.meta_path.insert(0, _AfterImport("structlog", lambda: configure(fmt, level)))


class _AfterImport:
    """A finder that finds nothing itself: on the first import of ``name``
    it steps out of ``sys.meta_path``, lets the other finders find the
    module, and has ``then`` called once the module has run, before the
    import returns. (Duck-typed, as the import system allows: the
    ``importlib.abc`` bases would cost an import of their own.)"""

    def __init__(self, name: str, then: Callable[[], None]) -> None:
        self.name = name
        self.then = then

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != self.name:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = cast("Loader", _ThenLoader(spec.loader, self.then))
        return spec


class _ThenLoader:
    """``loader``, with ``then`` called after the module has been executed."""

    def __init__(self, loader: Loader, then: Callable[[], None]) -> None:
        self.loader = loader
        self.then = then

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # The module keeps its own loader (for importlib.resources and the like).
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        self.then()
