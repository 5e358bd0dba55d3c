"""`engine serve` runs on tcmalloc (or jemalloc) where the machine has one, as vLLM's CPU backend does.

Why: under serving load glibc's malloc fragments.  Each step allocates and frees tensors whose
sizes change with the batch, between long-lived Python objects, and the freed holes are not
returned to the system.  The soak (`benchmarks/soak.py`, 500 requests, mlfq, 2-vCPU Xeon, one
day) grew resident memory 9.3% from its second quarter to its last on glibc, 1.6% on tcmalloc and
0.6% on jemalloc, with no Python-level growth (tracemalloc) and none of glibc's own knobs helping
(benchmarks/README.md, "Reliability under load").  tcmalloc also served more requests a second.

A malloc can only be replaced before the process starts, so `reexec_on_fast_allocator` runs the
same command again with the library in LD_PRELOAD (same PID: supervisors and tests see one
process).  ELASTIC_ENGINE_ALLOCATOR=system keeps glibc; an LD_PRELOAD the user set that already
names an allocator is left alone.  Only the long-running server does this: `import engine` in
someone else's program never re-executes it.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

ALLOCATOR_ENV = "ELASTIC_ENGINE_ALLOCATOR"  # "auto" (default) or "system"
# Most preferred first.  Debian: libtcmalloc-minimal4, libjemalloc2 (scripts/setup.sh installs the first).
CANDIDATES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libjemalloc.so.2")
ALLOCATOR_MARKERS = ("tcmalloc", "jemalloc")
SEARCH_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
               "/usr/local/lib", os.path.join(sys.prefix, "lib"))


def find_allocator() -> Path | None:
    for name in CANDIDATES:
        for directory in SEARCH_DIRS:
            path = Path(directory) / name
            if path.is_file():
                return path
    return None


def allocator_in_use(pid: int | str = "self") -> str:
    """'tcmalloc', 'jemalloc' or 'system': which malloc this process (or process `pid`) runs on."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return "system"
    return next((marker for marker in ALLOCATOR_MARKERS if f"lib{marker}" in maps), "system")


def reexec_on_fast_allocator() -> None:
    """Replace this process by the same command on tcmalloc or jemalloc, if one is installed and
    not yet loaded.  Returns when there is nothing to do; call it before torch is imported."""
    if sys.platform != "linux" or os.environ.get(ALLOCATOR_ENV, "auto") == "system":
        return
    preload = os.environ.get("LD_PRELOAD", "")
    if any(marker in preload for marker in ALLOCATOR_MARKERS):
        return  # already done (this is the re-executed process), or chosen by the user
    library = find_allocator()
    if library is None:
        logger.warning("Neither tcmalloc nor jemalloc is installed: resident memory can creep up under long "
                       "load on glibc's malloc (apt install libtcmalloc-minimal4; %s=system hides this)",
                       ALLOCATOR_ENV)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    env = {**os.environ, "LD_PRELOAD": f"{library} {preload}".strip()}
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
