"""Exponential backoff with jitter, in one place.

Every loop that retries against a parent (the uplink reconnecting, a fetch
trying again) waits through this, so thousands of children that lost their
parent at the same moment do not come back at the same moment.
"""

from __future__ import annotations

import asyncio
import random


class Backoff:
    """Delays that double from ``minimum`` up to ``maximum``, each spread
    over ±50 % so that retries from many nodes do not line up."""

    def __init__(self, minimum: float, maximum: float) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.attempts = 0

    @property
    def current(self) -> float:
        """The delay the next ``wait`` centres on."""
        return float(min(self.minimum * 2.0**self.attempts, self.maximum))

    def reset(self) -> None:
        """The last try worked: start from ``minimum`` again."""
        self.attempts = 0

    async def wait(self) -> None:
        delay = self.current
        self.attempts += 1
        await asyncio.sleep(delay * random.uniform(0.5, 1.5))
