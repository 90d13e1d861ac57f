"""AttentionSegLib.heap: freed memory kept for reuse within a block, given back after it (glibc only).

Page faults are counted by the kernel (``ru_minflt``): a block served by fresh mmap'd pages faults once per
4 KiB page it touches, a block reusing the heap's pages does not. Counts, not times, so the machine's load
does not matter. They are counted in a fresh interpreter: in this one, earlier tests leave free chunks in the
heap that a large block may happen to reuse without any help.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from AttentionSegLib import heap

#: Above glibc's largest mmap threshold (32 MiB), below a worker arena's heap (64 MiB).
BLOCK = 48 * 1024 * 1024
PAGES = BLOCK // 4096
REPEATS = 4

needs_glibc = pytest.mark.skipif(
    not heap.available(), reason="glibc's malloc is not this process's allocator"
)

PROBE = f"""
import json, resource, sys, threading
import torch
from AttentionSegLib import heap

def faults(repeats={REPEATS}, warm_up=12):
    # PyTorch's posix_memalign asks for a little more than a freed block holds: the heap's first rounds map
    # new pages until freed neighbours merge (glibc 2.36 settles after 8-9 rounds), as a network's first
    # slices do. Those are not counted.
    for _ in range(warm_up):
        torch.ones({BLOCK // 4})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        torch.ones({BLOCK // 4})
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def resident_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

def run(out):
    out["outside"] = faults()
    with heap.reuse_freed_memory() as acting:
        out["acting"] = acting
        with heap.reuse_freed_memory():
            pass
        out["active_after_inner_exit"] = heap.active()
        out["inside"] = faults()
        blocks = [torch.ones({BLOCK // 4}) for _ in range(4)]
        del blocks
        out["held_mib"] = resident_mib()
    out["active_after"] = heap.active()
    out["kept_mib"] = resident_mib()  # 192 MiB free: kept for the next step
    heap.KEEP_FREE_BYTES = 64 * 2**20
    with heap.reuse_freed_memory():
        blocks = [torch.ones({BLOCK // 4}) for _ in range(4)]
        del blocks
        out["held_again_mib"] = resident_mib()
    out["released_mib"] = resident_mib()  # more than KEEP_FREE_BYTES free: given back

out = {{}}
if sys.argv[1] == "thread":
    worker = threading.Thread(target=run, args=(out,))
    worker.start()
    worker.join()
else:
    run(out)
print(json.dumps(out))
"""


def _probe(where: str, env_off: bool = False) -> dict:
    env = {**os.environ, "ATTENTIONSEG_REUSE_MEMORY": "0"} if env_off else None
    done = subprocess.run(
        [sys.executable, "-c", PROBE, where], capture_output=True, text=True, timeout=300, env=env, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_glibc
@pytest.mark.parametrize("where", ["main", "thread"])
def test_within_the_block_a_freed_large_block_is_reused_without_page_faults(where: str) -> None:
    out = _probe(where)
    assert out["acting"] and out["active_after_inner_exit"] and not out["active_after"]
    assert out["outside"] >= REPEATS * PAGES * 0.9  # mmap'd afresh every time: every page faults
    assert out["inside"] <= REPEATS * PAGES * 0.05  # nested blocks: the inner exit restored nothing


@needs_glibc
def test_leaving_the_block_keeps_the_free_memory_for_the_next_step_up_to_a_bound() -> None:
    out = _probe("main")
    assert abs(out["held_mib"] - out["kept_mib"]) <= 0.1 * 4 * BLOCK / 2**20
    assert out["held_again_mib"] - out["released_mib"] >= 0.8 * 4 * BLOCK / 2**20


@needs_glibc
def test_turned_off_by_the_environment_it_changes_nothing() -> None:
    out = _probe("main", env_off=True)
    assert out["acting"] is False and not out["active_after_inner_exit"]
    assert out["inside"] >= REPEATS * PAGES * 0.9


def test_the_environment_variable_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTENTIONSEG_REUSE_MEMORY", "0")
    assert not heap.available()
    with heap.reuse_freed_memory() as acting:
        assert acting is False
        assert not heap.active()
