"""Freed memory goes back to the operating system (glibc's malloc).

glibc raises its mmap threshold each time a large block is freed, up to 32 MB: later
blocks of up to that size then come from the heap, where freed space stays with the
process, and every thread that allocates has a heap of its own. An edit frees and
allocates blocks of 1-32 MB all the time (activations, unfolded keys, blocks of them), so
its resident size can grow far past what it holds (an earlier reading, not re-measured:
VGG-16 at 3x240x240 at 11.7 GB of RSS with 2 threads; with this setting the same
benchmark peaked at 6.5 GB, docs/results.md, speed section). A fixed threshold (MMAP_THRESHOLD,
16 MB) keeps every larger block in a mapping of its own, unmapped when it is freed.

Setting the mmap threshold turns off glibc's matching rule for the trim threshold (the
free space at the top of a heap that ``free`` hands back at once), which then stays at
128 KB: a pass of 1-16 MB activations had its heap shrunk and grown again, every page
faulted and zeroed by the kernel each time (ResNet-18, 113 inputs in passes of 63:
23,000 page faults a run, 0.47 s; with TRIM_THRESHOLD 0.43 s and 600). It is set to
twice the mmap threshold, glibc's own ratio.

The CLI calls ``return_freed_memory`` once at start (it owns its process); a library
caller decides for their own process. Blocks under the threshold still come from the
heaps, where freed space in the middle of a heap stays resident: ``trim`` hands those
pages back (glibc's malloc_trim), and the edit calls it between layers and phases (VGG-16
at 240x240: 0.7 GB of free heap pages at the localisation's peak, mallinfo2). Elsewhere
than glibc both do nothing.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1        # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 16 << 20     # bytes: blocks this large or larger get their own mapping
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # bytes of free space at a heap's top that free() leaves in place


@functools.lru_cache(maxsize=None)
def _glibc(name: str):
    """glibc's function ``name`` with an int argument and result, or None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt / malloc_trim)
        return None
    fn.argtypes, fn.restype = [ctypes.c_int] * (2 if name == "mallopt" else 1), ctypes.c_int
    return fn


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD and its trim threshold at
    TRIM_THRESHOLD for this process; True when both took."""
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("malloc mmap threshold fixed at %d bytes, trim threshold at %d: %s", MMAP_THRESHOLD,
              TRIM_THRESHOLD, done)
    return done


def trim() -> None:
    """Hand the free pages of every malloc heap back to the system (glibc's malloc_trim)."""
    fn = _glibc("malloc_trim")
    if fn is not None:
        fn(0)


__all__ = ["return_freed_memory", "trim", "MMAP_THRESHOLD"]
