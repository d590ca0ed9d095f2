"""Keep glibc from growing the heap without bound during calibration.

glibc serves large allocations with ``mmap`` and returns them on free, but after such a free it raises its
mmap threshold to that size (up to 32 MiB), so later activation-sized temporaries come from the heap, whose
fragments it rarely gives back. Calibration allocates many short-lived copies of activations of changing
sizes (observers, range search), and the resident set then grows with every call: the bundled CIFAR-10 UNet,
8 trajectories of 50 steps, reached 14.2 GB (16 trajectories: over 24 GB, killed) where a fixed threshold keeps
it at 0.8 GB. Fixing the threshold at glibc's default (128 KiB) disables that growth for the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
THRESHOLD = 128 * 1024


@functools.cache
def cap_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at 128 KiB for this process (once); False where there is no glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD))
