"""The peak memory figures: a reset starts a new window, and the whole-life peak survives it."""

import subprocess
import sys

from conftest import ROOT

# a child process, so the figures are not this test process's own
CHILD = """
import numpy as np
from qwenvl_dq import allocator
a = np.ones(300 * 2**20 // 8); del a  # 300 MiB touched, then freed
assert allocator.reset_peak()
print(allocator.peak_rss() // 2**20, allocator.lifetime_peak() // 2**20)
"""


def test_lifetime_peak_keeps_what_a_reset_makes_the_kernel_forget():
    r = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    window, lifetime = map(int, r.stdout.split())
    assert lifetime >= 300, (window, lifetime)
    assert window < 200, window  # the kernel's VmHWM counts from the reset (so does the ru_maxrss wait4 gives)


# the start of a child that measures its own RSS with the mmap threshold pinned
PINNED = """
import numpy as np
from qwenvl_dq import allocator

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024

assert allocator.pin_mmap_threshold()
"""

# below THRESHOLD a buffer comes from the heap and stays after free until trim(); above it, it is returned on free
HEAP = PINNED + """
small, pins = [], []
for _ in range(200):  # 200 x 1 MiB, under the threshold: the heap, each followed by a small buffer kept in use
    small.append(np.ones((1 << 20) // 8))
    pins.append(np.ones(8192))  # so the freed blocks cannot merge into the heap's top and shrink it on free
base = rss()
del small
kept = rss()
allocator.trim()
trimmed = rss()
big = [np.ones((8 << 20) // 8) for _ in range(20)]  # 20 x 8 MiB, over the threshold: mmapped
grown = rss()
del big
print(base, kept, trimmed, grown, rss())
"""


def test_small_buffers_stay_in_the_heap_until_trimmed_and_large_ones_go_back_on_free():
    r = subprocess.run([sys.executable, "-c", HEAP], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    base, kept, trimmed, grown, freed = map(int, r.stdout.split())
    assert kept > base - 20, (base, kept)  # freed, still resident
    assert trimmed < kept - 150, (kept, trimmed)  # handed back by trim()
    assert grown > trimmed + 150 and freed < grown - 150, (trimmed, grown, freed)  # mmapped: back on free


def _mapped(addr: int) -> bool:
    with open("/proc/self/maps") as f:
        for line in f:
            start, end = (int(v, 16) for v in line.split()[0].split("-"))
            if start <= addr < end:
                return True
    return False


def test_a_tensor_outside_the_heap_has_a_mapping_of_its_own_that_goes_with_it():
    import gc
    import mmap

    import torch

    from qwenvl_dq import allocator

    src = torch.arange(3 << 15, dtype=torch.float32).reshape(3, 1 << 15).to(torch.bfloat16)
    t = allocator.outside_heap(src, torch.float32)  # 384 KiB
    assert t.dtype == torch.float32 and t.shape == (3, 1 << 15) and torch.equal(t, src.float())
    addr = t.data_ptr()
    assert addr % mmap.PAGESIZE == 0 and _mapped(addr)  # the start of a mapping, not a heap chunk
    t.mul_(2)  # writable
    assert float(t[2, -1]) == 2 * float(src[2, -1])
    del t
    gc.collect()
    assert not _mapped(addr)  # unmapped with the tensor
    small = allocator.outside_heap(src[:, :8])  # under OUTSIDE_MIN: a plain copy
    assert small.dtype == torch.bfloat16 and torch.equal(small, src[:, :8]) and small.data_ptr() != src.data_ptr()


# once pinned, a freed buffer at the heap's top stays for reuse (glibc's trim threshold would give back anything
# over 128 KiB at once, and the next buffer would be page-faulted in again) until trim()
TOP = PINNED + """
a = np.ones((3 << 20) // 8)  # 3 MiB, under the threshold: the heap's top
held = rss()
del a
kept = rss()
allocator.trim()
print(held, kept, rss())
"""


def test_a_freed_buffer_at_the_top_of_the_heap_stays_until_trimmed():
    r = subprocess.run([sys.executable, "-c", TOP], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    held, kept, trimmed = map(int, r.stdout.split())
    assert kept >= held - 1, (held, kept)  # not handed back on free
    assert trimmed <= kept - 2, (kept, trimmed)  # handed back by trim()
