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
