"""Kernel tests run the Triton kernels in Triton's interpreter, on CPU tensors.

TRITON_INTERPRET is read when a `@triton.jit` decorator runs: for our kernels when their module is
imported, and for triton.language's own jit helpers (tl.zeros, tl.sum, tl.max, ...) when triton
itself is first imported. So it must be set before either; this conftest's top is the earliest
point this directory controls (pytest loads it before any test module here). Importing torch
earlier is harmless: it does not import triton.

If something earlier in the session did import triton or a kernel module uninterpreted (another
test directory, a plugin), those modules are dropped from sys.modules, keeping triton's compiled
extension, so the imports below re-run their decorators under the interpreter.  The C++ kernels'
modules (engine.kernels.cpu) use no Triton and stay: the model and runner hold them, and a second
copy would have a library cache of its own. The variable stays
set for the rest of the session: on a CPU-only machine the interpreter is the only way a kernel
can run at all.
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"


def _drop_uninterpreted_modules() -> None:
    standard = sys.modules.get("triton.language.standard")
    triton_is_stale = standard is not None and type(standard.zeros).__name__ != "InterpretedFunction"
    for name in list(sys.modules):
        is_triton = (name == "triton" or name.startswith("triton.")) and not name.startswith("triton._C")
        is_triton_kernel = name.startswith("engine.kernels.") and not name.startswith("engine.kernels.cpu")
        if is_triton_kernel or (triton_is_stale and is_triton):
            del sys.modules[name]


_drop_uninterpreted_modules()

import ctypes  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---- the C++ kernels: one fixture runs a test against every build this CPU supports ----

from engine.capabilities import cpu_features  # noqa: E402
from engine.kernels.cpu import native_library  # noqa: E402


@pytest.fixture(params=list(native_library.ISA_FLAGS))
def library(request: pytest.FixtureRequest) -> ctypes.CDLL:
    """Each build of the kernels in turn; one this CPU cannot run, or cannot build, skips."""
    isa = request.param
    if isa not in cpu_features().kernel_isas:
        pytest.skip(f"this CPU cannot run the {isa} build ({cpu_features().describe()})")
    built = native_library.load(isa)
    if built is None:
        pytest.skip(f"the {isa} build is not available here (no C++ compiler or a failed build: see the log)")
    return built
