"""Process-wide settings that must be in place before torch is imported (or, for oneDNN's, before
its first kernel).

`engine/__init__.py` imports this module first, so `import engine` (or `engine serve`) applies
them; a program that imported torch before engine keeps torch's defaults.  A variable the user
already set is left as it is.

PERF: THP_MEM_ALLOC_ENABLE=1 has torch's CPU allocator back allocations of 2 MiB and more with
transparent huge pages (madvise), which this kernel grants only on request.  The decode step's K/V
gathers and activations then take far fewer TLB misses.  On the 2-core dev machine it took the
offline benchmark (64 ShareGPT requests x 128 tokens) from 14.9 to 13.4 s when the heap had been
fragmented by a freed dataset, and ~3% faster on a fresh heap.

ONEDNN_PRIMITIVE_CACHE_CAPACITY=4096: oneDNN compiles a kernel for every (rows, weight shape) a
prepacked bf16 linear meets (~3.5 ms each on a 2-vCPU Xeon with AMX) and keeps 1,024 of them by
default.  An elastic model's level slices have ~65 weight shapes and prefill steps ~50 row buckets
(engine/model/layers/linear.py, packed_rows_bucket), so #15's workload had met 1,143 distinct
shapes after five runs: past 1,024 the cache evicted and compiled again, 289 compiles (1.07 s) in
the fifth run against 56 (0.17 s) with room for all (benchmarks/README.md, "oneDNN's compiles in a
process's first runs").  A cached kernel holds ~0.5 MB, so memory grows only with the shapes met.

Under a CPU-feature mask (ELASTIC_ENGINE_CPU_ISA, see engine/capabilities.py) torch's and oneDNN's
own kernel dispatch is capped to the same level through ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA,
which both libraries read once, when they load.
"""

from __future__ import annotations

import os

from engine import capabilities

DEFAULTS = {"THP_MEM_ALLOC_ENABLE": "1", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "4096"}


def apply_defaults() -> None:
    for name, value in {**DEFAULTS, **_library_caps()}.items():
        os.environ.setdefault(name, value)


def _library_caps() -> dict[str, str]:
    try:
        return capabilities.library_env(capabilities.cpu_features())
    except capabilities.CapabilityError:
        return {}  # said where the engine starts (engine/llm_engine.py), with the values it takes


apply_defaults()
