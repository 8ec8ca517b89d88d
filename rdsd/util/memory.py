"""Giving memory freed after a burst back to the operating system.

glibc's allocator returns freed memory to the system only from the top of
its heaps. A burst of connections (a storm of TLS handshakes, a flood of
hostile peers, a wave of fetches) allocates buffers and OpenSSL state all
over the heaps; once they are freed, the few allocations still alive in
between pin the pages, and the process keeps its peak size for good
(measured: 150 refused connections took a server from 50 to 137 MB, and it
stayed there with no Python object left over). ``malloc_trim(0)`` hands
every free page in every arena back (``madvise``), which brought the same
server back to 51 MB. It costs a walk of the allocator's free lists, a few
milliseconds at most, so callers run it once a burst has ended, not per
connection. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any


@functools.cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def give_back() -> bool:
    """Return free heap pages to the system; True if the allocator can."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
