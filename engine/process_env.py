"""Process-wide settings that must be in place before torch is imported.

`engine/__init__.py` imports this module first, so `import engine` (or `engine serve`) applies
them; a program that imported torch before engine keeps torch's defaults.  A variable the user
already set is left as it is.

PERF: THP_MEM_ALLOC_ENABLE=1 has torch's CPU allocator back allocations of 2 MiB and more with
transparent huge pages (madvise), which this kernel grants only on request.  The decode step's K/V
gathers and activations then take far fewer TLB misses.  On the 2-core dev machine it took the
offline benchmark (64 ShareGPT requests x 128 tokens) from 14.9 to 13.4 s when the heap had been
fragmented by a freed dataset, and ~3% faster on a fresh heap.

Under a CPU-feature mask (ELASTIC_ENGINE_CPU_ISA, see engine/capabilities.py) torch's and oneDNN's
own kernel dispatch is capped to the same level through ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA,
which both libraries read once, when they load.
"""

from __future__ import annotations

import os

from engine import capabilities

DEFAULTS = {"THP_MEM_ALLOC_ENABLE": "1"}


def apply_defaults() -> None:
    for name, value in {**DEFAULTS, **_library_caps()}.items():
        os.environ.setdefault(name, value)


def _library_caps() -> dict[str, str]:
    try:
        return capabilities.library_env(capabilities.cpu_features())
    except capabilities.CapabilityError:
        return {}  # said where the engine starts (engine/llm_engine.py), with the values it takes


apply_defaults()
