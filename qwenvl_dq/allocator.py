"""Keep freed layer-sized buffers out of the heap, so peak RSS follows one layer, not the model's depth.

glibc serves large allocations with mmap and returns them to the OS on free, but each free of an mmapped chunk
raises its mmap threshold to that chunk's size; from then on, buffers of a layer's size come from the heap, and
freeing them does not shrink the process. Loading and freeing one layer after another then grows RSS with every
layer (measured: 8 -> 32 decoder layers took RSS from 0.8 to 1.6 GiB). Pinning the threshold turns that off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3
THRESHOLD = 128 * 1024  # glibc's own initial value
_before = 0  # the highest VmHWM read before the last reset_peak()


def pin_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold (no-op elsewhere); returns whether it took effect."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        log.debug("mallopt unavailable; peak memory may grow with the number of layers")
        return False


def reset_peak() -> bool:
    """Start a new peak-RSS window (Linux: /proc/self/clear_refs "5" resets VmHWM); whether it took effect.
    The kernel forgets the peak before a reset (VmHWM, and the ru_maxrss a parent gets from wait4, count from it
    on): lifetime_peak() keeps it."""
    global _before
    _before = max(_before, peak_rss())
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident bytes of this process since start or the last reset_peak() (0 where unknown)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def lifetime_peak() -> int:
    """Peak resident bytes of this process since it started, across reset_peak() windows."""
    return max(_before, peak_rss())
