"""Freed memory goes back to the system (onnx_dynedit.memory): with the mmap threshold
fixed, blocks freed after a burst of 1-32 MB allocations leave the resident size where it
was; the CLI sets it for its own process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

BURST = textwrap.dedent("""
    import sys, numpy as np
    from onnx_dynedit.memory import MMAP_THRESHOLD, return_freed_memory

    def rss_mb():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

    assert return_freed_memory()
    big = [np.ones(MMAP_THRESHOLD // 8 + 1024 * (i % 7)) for i in range(8)]  # raise a dynamic threshold
    del big
    before = rss_mb()
    keep, blocks = [], []
    for i in range(300):  # blocks just over the threshold, freed out of order, small ones kept between
        blocks.append(np.ones(MMAP_THRESHOLD // 8 + 4096 * (i % 5)))
        keep.append(np.ones(64))
        if i % 3 == 2:
            blocks.pop(0)
    del blocks
    print(rss_mb() - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_blocks_leave_the_process():
    grown = float(subprocess.run([sys.executable, "-c", BURST], check=True, capture_output=True,
                                 text=True).stdout.strip())
    assert grown < 64  # MB: about 100 blocks of >= 4 MB were alive at the end before ``del``
