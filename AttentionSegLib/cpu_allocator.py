"""Huge pages for PyTorch's large CPU buffers, asked for before torch is imported.

LiteMedSAM's image encoder keeps a 256x256 map with 256 channels in its first stage (33.5 MB per tensor in
bfloat16), and the mask decoder upscales every prompt's answer to 32x256x256: buffers that glibc hands out as
fresh memory maps, so each one is paid again in page faults (4 KiB at a time) every time it is allocated.
PyTorch (2.2 and later, ``c10/core/alloc_cpu.cpp``) backs CPU buffers of 2 MiB and more with transparent huge
pages when the environment variable ``THP_MEM_ALLOC_ENABLE`` is set: 512 times fewer faults. It reads the
variable once, at its first CPU allocation, so the entry points (``attentionseg``, the Slicer module, the
benchmarks) call :func:`prefer_huge_pages` before torch is imported.

Measured on this project's 2-core machine (``benchmarks/medsam_speed.py``; a virtual machine, where a page
fault costs more than on bare metal): see the module docstring of that benchmark and
``benchmarks/results/medsam_speed.md``.

This module imports nothing heavy: it must run before torch.
"""

from __future__ import annotations

import os
import sys

#: PyTorch's switch for transparent huge pages in its CPU allocator (buffers of 2 MiB and more; Linux).
HUGE_PAGES_VARIABLE = "THP_MEM_ALLOC_ENABLE"


def prefer_huge_pages() -> bool:
    """Ask PyTorch to back its CPU buffers of 2 MiB and more with transparent huge pages.

    Sets ``THP_MEM_ALLOC_ENABLE=1`` unless the user has set it (``0`` turns it off), on Linux only (the only
    system where PyTorch honours it), and only while torch is not yet imported: PyTorch reads the variable at
    its first CPU allocation. Returns whether PyTorch will find the variable on (``1``, the one value besides
    ``0`` it accepts).
    """
    if not sys.platform.startswith("linux") or "torch" in sys.modules:
        return False
    return os.environ.setdefault(HUGE_PAGES_VARIABLE, "1") == "1"
