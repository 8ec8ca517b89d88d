"""An optional hook for whoever wants to count traffic (benchmarks, tests,
an embedder's metrics), so the production path carries no counters of its
own. A node passes its observer to every session it opens or accepts."""

from __future__ import annotations

from typing import Protocol


class TrafficObserver(Protocol):
    def frames_sent(self, peer: str, nbytes: int) -> None:
        """``nbytes`` of framed data were handed to the transport for ``peer``."""

    def package_served(self, peer: str, nbytes: int) -> None:
        """``nbytes`` of package data were sent to ``peer`` (chunk payloads only)."""
