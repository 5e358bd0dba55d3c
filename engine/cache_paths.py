"""The engine's one cache root: ~/.cache/elastic-engine, or $XDG_CACHE_HOME/elastic-engine.

C++ kernel builds (engine/kernels/cpu/native_library.py) and elastic checkpoints
(engine/elastic/checkpoint.py) live under it, each in its own subdirectory."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "elastic-engine"
