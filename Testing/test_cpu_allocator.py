"""Huge pages for PyTorch's CPU buffers (``AttentionSegLib.cpu_allocator``), each case in a fresh interpreter:
PyTorch reads the switch once, at its first CPU allocation.

Whether PyTorch took the switch is read from its allocator: with ``THP_MEM_ALLOC_ENABLE`` on it aligns its
buffers of 2 MiB and more to the page (4 KiB) for ``madvise(MADV_HUGEPAGE)``; without it they are 64-byte
aligned (glibc maps such a buffer with a 16-byte header: never on a page boundary).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PyTorch reads it on Linux only")

PAGE_ALIGNED = """
import torch
buffers = [torch.empty(4 << 20, dtype=torch.uint8) for _ in range(8)]
print("page-aligned" if all(b.data_ptr() % 4096 == 0 for b in buffers) else "not page-aligned")
"""


def _run(code: str, **env: str) -> list[str]:
    environment = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    environment.update(env)
    done = subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, text=True, check=True, timeout=120
    )
    return done.stdout.split()


def test_asked_before_torch_pytorch_takes_huge_pages() -> None:
    out = _run(
        "import os\nfrom AttentionSegLib.cpu_allocator import prefer_huge_pages\n"
        "print(prefer_huge_pages(), os.environ['THP_MEM_ALLOC_ENABLE'])\n" + PAGE_ALIGNED
    )
    assert out == ["True", "1", "page-aligned"]


def test_without_the_call_pytorch_keeps_its_default() -> None:
    assert _run(PAGE_ALIGNED) == ["not", "page-aligned"]


def test_the_users_setting_wins() -> None:
    out = _run(
        "import os\nfrom AttentionSegLib.cpu_allocator import prefer_huge_pages\n"
        "print(prefer_huge_pages(), os.environ['THP_MEM_ALLOC_ENABLE'])\n" + PAGE_ALIGNED,
        THP_MEM_ALLOC_ENABLE="0",
    )
    assert out == ["False", "0", "not", "page-aligned"]


def test_after_torch_is_imported_it_is_too_late_and_sets_nothing() -> None:
    out = _run(
        "import os, torch\nfrom AttentionSegLib.cpu_allocator import prefer_huge_pages\n"
        "print(prefer_huge_pages(), os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset'))\n"
    )
    assert out == ["False", "unset"]


def test_the_cli_asks_before_it_imports_torch() -> None:
    """``attentionseg models`` (a command that loads torch) in-process, then the allocator's alignment."""
    out = _run(
        "import contextlib, io\nfrom AttentionSegLib.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n    status = main(['models'])\n"
        "print(status)\n" + PAGE_ALIGNED
    )
    assert out == ["0", "page-aligned"]
