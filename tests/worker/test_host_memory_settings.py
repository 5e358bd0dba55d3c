"""Process-level memory settings: huge pages for torch's large allocations (engine.process_env)
and glibc keeping freed blocks (engine.worker.host_allocator).  Each runs in a fresh interpreter:
both are process-wide and must not leak into, or depend on, this test process."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

from engine.model.compute_plan import _can_prepack_bf16


# The variables engine.process_env sets in this test process too: a child must not inherit them.
ENGINE_DEFAULTS = ("THP_MEM_ALLOC_ENABLE", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")


def run_python(code: str, **env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if k not in ENGINE_DEFAULTS} | env
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_importing_engine_turns_on_huge_pages_before_torch_loads():
    assert run_python("import engine, os, torch; print(os.environ['THP_MEM_ALLOC_ENABLE'])") == "1"


def test_a_value_the_user_set_is_kept():
    assert run_python("import engine, os; print(os.environ['THP_MEM_ALLOC_ENABLE'])", THP_MEM_ALLOC_ENABLE="0") == "0"


# Bytes glibc holds in mmapped chunks (mallinfo2().hblkhd), before and after a 16 MiB tensor.
MMAPPED_GROWTH = """
import ctypes
from engine.worker.host_allocator import keep_freed_memory
import torch

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if {keep}:
    assert keep_freed_memory()
before = libc.mallinfo2().hblkhd
tensor = torch.empty(16 << 20, dtype=torch.uint8)
print(libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="needs glibc 2.33+ (mallinfo2)")
def test_large_temporaries_come_from_the_heap_once_freed_memory_is_kept():
    # The control shows the measure can fail: by default glibc mmaps a 16 MiB block.
    assert int(run_python(MMAPPED_GROWTH.format(keep=False))) >= 16 << 20
    assert int(run_python(MMAPPED_GROWTH.format(keep=True))) == 0


# 1,100 distinct oneDNN kernels (one prepacked bf16 weight at 1..1,100 rows), then the first again:
# oneDNN's verbose log then says whether its cache still held that one ("create:cache_hit").
KERNEL_CACHE_PROBE = """
import engine
import torch

weight = torch.ops.mkldnn._reorder_linear_weight(torch.ones(32, 64, dtype=torch.bfloat16), None)
x = torch.ones(1100, 64, dtype=torch.bfloat16)
for rows in range(1, 1101):
    torch.ops.mkldnn._linear_pointwise(x[:rows], weight, None, "none", [], "")
print("again")
torch.ops.mkldnn._linear_pointwise(x[:1], weight, None, "none", [], "")
"""


def kernel_cache_kept_the_first(**env: str) -> bool:
    """`env`: ONEDNN_PRIMITIVE_CACHE_CAPACITY as the user sets it, or nothing (unset)."""
    out = run_python(KERNEL_CACHE_PROBE, ONEDNN_VERBOSE="profile_create", **env)
    again = [line for line in out.split("again", 1)[1].splitlines()
             if "create:cache_" in line and ",reorder," not in line]
    assert len(again) == 1, out[-2000:]
    return "create:cache_hit" in again[0]


@pytest.mark.skipif(not _can_prepack_bf16(), reason="this CPU or torch build does not prepack bf16 for oneDNN")
def test_onednn_keeps_more_kernels_than_its_default_under_the_engine():
    """The engine's default (4,096) holds 1,100 kernels; oneDNN's own 1,024, kept where the user
    set it, does not: the control shows the probe can fail."""
    assert kernel_cache_kept_the_first()
    assert not kernel_cache_kept_the_first(ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024")
