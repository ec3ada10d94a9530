"""Where freed buffers go: peak RSS follows one layer, not the model's depth, without paying the kernel for
every temporary.

glibc serves an allocation at or above its mmap threshold with a fresh mmap, returned to the OS on free; below it,
from the heap, reused but not returned. Left alone, each free of an mmapped chunk raises the threshold to that
chunk's size (up to 32 MiB); from then on layer-sized buffers come from the heap, and loading and freeing one
layer after another grows RSS with every layer (measured: 8 -> 32 decoder layers took RSS from 0.5 to 1.7 GiB).
Pinned too low (glibc's initial 128 KiB), every temporary is a fresh mmap that the kernel zero-fills page by
page: measured here, a [1536 x 1024] float32 multiply took 2.9 ms instead of 0.09 ms, and a run of the bench's
medium model 22.9 s instead of 16.1 s (none), about 80 s instead of 44.5 s (m2). So the threshold is pinned at
THRESHOLD (a sample's activations on a medium model come from the heap; a layer's weights, and on a large model
every activation, are mmapped and returned), raised to SEARCH_THRESHOLD while an anti-outlier search scores its
candidates (their quantized weights and outputs are reused hundreds of times), and the heap's free pages are
handed back (malloc_trim) after each search and each layer. Setting the threshold fixes glibc's trim threshold
at its default 128 KiB, so every freed temporary over that at the heap's top went straight back to the OS and the
next one was page-faulted in again (measured: summing the rows of a 4096 x 4096 int8 weight in 2 MiB blocks took
27.9 ms instead of 1.4): the trim threshold goes with the mmap threshold, at twice it.

What outlives a search is not left to the heap at all (`outside_heap`): a layer's weights, the hidden states
carried from layer to layer and the search's token reservoirs each get a mapping of their own. From the heap they
would take the free chunks a search leaves behind (a chunk over the threshold is served from free heap space when
some fits), and the arena, pinned by them, grew by 20-30 MiB of free space per layer (glibc's mallinfo2, m2 on
the bench's 8-layer model: 250 -> 400-510 MiB across the layers in some runs, flat in others). Out of the
heap, the m2 peak is lower and steadier on 8 layers; some runs still creep with depth (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import mmap
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 4 << 20
SEARCH_THRESHOLD = 16 << 20
OUTSIDE_MIN = 64 << 10  # smaller long-lived tensors stay in the heap (a mapping is a page at least)
_before = 0  # the highest VmHWM read before the last reset_peak()


@functools.cache
def _libc():
    """glibc, or None (musl, macOS: the allocator is left as it is)."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim"):  # glibc
            return libc
    except OSError:
        pass
    log.debug("mallopt unavailable; peak memory may grow with the number of layers")
    return None


def _set_threshold(size: int) -> bool:
    """The mmap threshold, and the trim threshold at twice it (glibc's own rule while the threshold is dynamic);
    whether the mmap threshold took effect (what a caller restores)."""
    libc = _libc()
    if not (libc and libc.mallopt(M_MMAP_THRESHOLD, size)):
        return False
    libc.mallopt(M_TRIM_THRESHOLD, 2 * size)
    return True


def pin_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at THRESHOLD (no-op elsewhere); returns whether it took effect."""
    return _set_threshold(THRESHOLD)


def trim() -> None:
    """Hand the heap's free pages back to the OS (no-op elsewhere)."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


@contextlib.contextmanager
def search_heap():
    """While an anti-outlier search runs: buffers up to SEARCH_THRESHOLD from the heap; trimmed after."""
    raised = _set_threshold(SEARCH_THRESHOLD)
    try:
        yield
    finally:
        if raised:
            _set_threshold(THRESHOLD)
        trim()


def outside_heap(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A copy of t (in `dtype`, default its own) in an anonymous mapping of its own, unmapped when the copy is freed;
    a plain copy on other devices, for tensors under OUTSIDE_MIN bytes, or where mmap cannot map privately."""
    import torch  # here: the peak figures need no torch

    dtype = dtype or t.dtype
    n = t.numel() * dtype.itemsize
    if t.device.type != "cpu" or n < OUTSIDE_MIN or not hasattr(mmap, "MAP_PRIVATE"):
        return t.to(dtype, copy=True)
    buf = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE)  # the tensor's storage holds buf; freed with it
    return torch.frombuffer(buf, dtype=dtype, count=t.numel()).view(t.shape).copy_(t)


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
