"""Build and load the engine's C++ CPU kernels (the .cpp and .h files beside this module).

The library is compiled on first use with the system's C++ compiler for this very CPU
(-march=native), then cached by a hash of source, compiler, flags and CPU, so later processes
load it in milliseconds.  It is plain C ABI called through ctypes (which releases the GIL): no
Python headers, no torch headers, a build of about two seconds.

Anything that goes wrong (no compiler, no AVX-512, a failed build) leaves `load()` returning
None after one log line, and the engine keeps its torch path.  ELASTIC_ENGINE_NATIVE_KERNELS=0
turns the library off.

Invariant: torch is imported before the library is loaded, so the library's libgomp.so.1 resolves
to the OpenMP runtime torch already loaded and both share one thread pool.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch  # loaded first: see the invariant above

logger = logging.getLogger(__name__)

# The dtype codes every kernel takes (DType in simd.h).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

KERNEL_DIR = Path(__file__).parent
SOURCES = tuple(sorted(KERNEL_DIR.glob("*.cpp")))
HEADERS = tuple(sorted(KERNEL_DIR.glob("*.h")))
# -ffp-contract=off: a multiply then an add must round twice, as torch's separate ops do (the
# kernels ask for fused multiply-adds explicitly where they want them).
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fopenmp", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=off")
DISABLE_ENV = "ELASTIC_ENGINE_NATIVE_KERNELS"


@functools.cache
def load() -> ctypes.CDLL | None:
    """The loaded library, or None when this machine cannot have it (said once in the log)."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        logger.info("native CPU kernels off (%s=0): using the torch path", DISABLE_ENV)
        return None
    try:
        library = ctypes.CDLL(str(_built_library()))
    except (OSError, subprocess.CalledProcessError, FileNotFoundError) as error:
        logger.warning("native CPU kernels unavailable, using the torch path: %s", error)
        return None
    if not library.engine_cpu_kernels_available():
        logger.info("native CPU kernels need AVX-512, which this CPU lacks: using the torch path")
        return None
    _declare_signatures(library)
    return library


def _built_library() -> Path:
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise FileNotFoundError("no C++ compiler (g++, or $CXX) on PATH")
    path = _cache_dir() / f"libengine_cpu_{_build_key(compiler)}.so"
    if not path.exists():
        _compile(compiler, path)
    return path


def _build_key(compiler: str) -> str:
    digest = hashlib.sha256()
    for source in SOURCES + HEADERS:
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    digest.update("\0".join((compiler, version, *FLAGS, platform.machine(), _cpu_flags())).encode())
    return digest.hexdigest()[:16]


def _cpu_flags() -> str:
    """-march=native builds for this CPU: a cache shared across machines must not mix them up."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    directory = Path(root) / "elastic-engine" / "kernels"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _compile(compiler: str, path: Path) -> None:
    """Build into a temporary name, then rename: processes building at once never load a half
    written file, and the last rename wins with an identical library."""
    logger.info("building native CPU kernels (once per machine): %s", path)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        partial = Path(scratch) / path.name
        result = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", str(partial)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise OSError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(partial, path)


def _declare_signatures(library: ctypes.CDLL) -> None:
    """Argument types of every kernel (see each .cpp's extern "C" function); all return 0 or -1."""
    pointer, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    signatures = {
        # query, query_stride, key_cache, value_cache, block_tables, block_table_stride, seq_lens, out,
        # num_seqs, num_q_heads, num_kv_heads, head_dim, block_size, scale, dtype, threads
        "paged_decode_attention": [pointer, i64, pointer, pointer, pointer, i64, pointer, pointer,
                                   i32, i32, i32, i32, i32, f32, i32, i32],
        # x, x_stride, residual, weight, out, rows, hidden, eps, dtype, threads
        "rms_norm": [pointer, i64, pointer, pointer, pointer, i64, i64, f32, i32, i32],
        # x, tokens, heads, head_dim, token_stride, cos, sin, dtype, threads
        "rotary_embedding": [pointer, i64, i64, i64, i64, pointer, pointer, i32, i32],
        # x, out, tokens, n, dtype, threads
        "silu_and_mul": [pointer, pointer, i64, i64, i32, i32],
    }
    for name, argtypes in signatures.items():
        function = getattr(library, name)
        function.argtypes = argtypes
        function.restype = i32
