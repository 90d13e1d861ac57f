"""Keep freed memory for reuse while a network runs slice after slice, or step after step, on the CPU (glibc's
malloc).

PyTorch's CPU tensors come from ``malloc``. glibc serves a block above its mmap threshold (at most 32 MiB)
with fresh pages from the kernel and gives them back on ``free``, so every large activation of a network is
page-faulted in anew, 4 KiB at a time; in a virtual machine each fault is a trap to the hypervisor. The
LiteMedSAM encoder makes maps of 16-64 MiB per slice (float32, 256 x 256, 64-256 channels): on 2 cores of an
AMD EPYC VM one slice cost 71,000-79,000 page faults (0.2-0.3 s of system time), 0-400 within this block
once the first slices have mapped the heap (the heap then holds a few times its largest block).

While :func:`reuse_freed_memory` is active, malloc takes every block from its heaps (``M_MMAP_MAX`` 0), keeps
what is freed there (``M_TRIM_THRESHOLD``) and keeps a worker thread's emptied heap for the next block
(``M_TOP_PAD``), so the next slice's maps land on pages already mapped. On leaving the outermost block, mmap
is allowed again for blocks above 32 MiB (glibc's ceiling for its adaptive threshold, which any ``mallopt``
freezes). The free memory stays for the next step, which needs about as much (given back, a refine after a
click page-faulted 31,000 times and took 0.62 s instead of 0.49 s), unless it exceeds
:data:`KEEP_FREE_BYTES`: then it goes back to the system (``malloc_trim``). A worker thread's arena still
maps a block above 64 MiB afresh (glibc's heap size), which is why the encoder keeps its maps within 32 MiB
(:data:`~AttentionSegLib.networks.medsam_lite.tiny_vit.MAX_HIDDEN_BYTES`). Elsewhere (macOS, Windows, musl)
this does nothing; ``ATTENTIONSEG_REUSE_MEMORY=0`` turns it off.

Who uses it: inference (:func:`~AttentionSegLib.inference.predict_volume`), every step of the interactive
session, and training (:func:`~AttentionSegLib.training.train`: a 2D step of ``benchmarks/acdc.py``'s quick
profile 1.04x faster, a 3D step 1.06x, 5,000 and 74,000 page faults a step fewer;
``benchmarks/training_speed.py``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# mallopt parameters (glibc <malloc.h>)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4

#: Within the block: no mmap, no trimming, 64 MiB kept on top of a heap (a worker arena's heap size).
TRIM_THRESHOLD_KEEP = 2**31 - 1  # mallopt takes an int
TOP_PAD_KEEP = 64 * 1024 * 1024
#: On leaving: glibc's defaults (``mallopt(3)``), with the mmap threshold where glibc's adaptive rule takes it
#: under a tensor workload (its maximum) and the trim threshold twice that, as the rule sets it.
MMAP_MAX_DEFAULT = 65536
TOP_PAD_DEFAULT = 128 * 1024
MMAP_THRESHOLD_AFTER = 32 * 1024 * 1024
TRIM_THRESHOLD_AFTER = 2 * MMAP_THRESHOLD_AFTER
#: Free memory (bytes) the heaps may keep for the next step on leaving; above it, all of it is given back.
KEEP_FREE_BYTES = 1024**3


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")
    ]


_lock = threading.Lock()
_depth = 0


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (whose ``mallopt`` parameters these are), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


def free_bytes() -> int | None:
    """Bytes free in malloc's heaps (``mallinfo2().fordblks``, glibc 2.33 and later), else None."""
    libc = _glibc()
    mallinfo2 = getattr(libc, "mallinfo2", None) if libc is not None else None
    if mallinfo2 is None:
        return None
    mallinfo2.restype = _MallInfo2
    return int(mallinfo2().fordblks)


def available() -> bool:
    """Whether :func:`reuse_freed_memory` changes anything here (glibc, and not turned off)."""
    return _glibc() is not None and os.environ.get("ATTENTIONSEG_REUSE_MEMORY", "1") != "0"


def active() -> bool:
    """Whether a :func:`reuse_freed_memory` block is open in this process."""
    return _depth > 0


@contextmanager
def reuse_freed_memory() -> Iterator[bool]:
    """Within the block, freed memory stays mapped for the next allocation (see the module).

    Nests, and may be entered from several threads: the outermost exit restores. Yields whether it acts.
    """
    global _depth
    libc = _glibc() if available() else None
    if libc is None:
        yield False
        return
    with _lock:
        if _depth == 0:
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_KEEP)
            libc.mallopt(M_TOP_PAD, TOP_PAD_KEEP)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(M_TOP_PAD, TOP_PAD_DEFAULT)
                libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_AFTER)
                libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_AFTER)
                libc.mallopt(M_MMAP_MAX, MMAP_MAX_DEFAULT)
                free = free_bytes()
                if free is None or free > KEEP_FREE_BYTES:
                    libc.malloc_trim(0)
