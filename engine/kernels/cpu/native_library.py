"""Build and load the engine's C++ CPU kernels (the .cpp and .h files beside this module).

Every *.cpp here is compiled into one library per ISA build, each with its own explicit flags
(ISA_FLAGS), so that one machine can build, and test, what another CPU runs:

    build         runs on                                    vector lanes (simd.h)
    avx512_bf16   AVX-512 F/BW/VL/DQ and AVX512-BF16         16
    avx512        AVX-512 F/BW/VL/DQ                         16
    avx2          AVX2, FMA and F16C                         8

A build is compiled on first use with the system's C++ compiler, then cached by a hash of the
sources, the compiler's version and the flags (the ISA among them), so later processes load it in
milliseconds.  -mtune=native only schedules instructions for the building CPU: a build runs on
any CPU with its ISA.  It is plain C ABI called through ctypes (which releases the GIL): no
Python headers, no torch headers, a build of a few seconds.

`load()` gives the build for `cpu_features().kernel_isa` (engine/capabilities.py: the best this
CPU runs, capped by ELASTIC_ENGINE_CPU_ISA), `load(isa)` a given build.  Anything that goes wrong
(no compiler, a CPU without the ISA, a failed build) leaves it returning None after one log line,
and the engine keeps its torch path: it never raises for a missing CPU feature (only for a mask
that names no level, the user's error, with the levels it takes).  ELASTIC_ENGINE_NATIVE_KERNELS=0
turns every build off.  `active_isa()` says which build is in use.

Invariant: torch is imported before the library is loaded, so the library's libgomp.so.1 resolves
to the OpenMP runtime torch already loaded and both share one thread pool.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch  # loaded first: see the invariant above

from engine.cache_paths import cache_root
from engine.capabilities import cpu_features

T = TypeVar("T")

logger = logging.getLogger(__name__)

# The dtype codes every kernel takes (DType in simd.h).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

KERNEL_DIR = Path(__file__).parent
# -ffp-contract=off: a multiply then an add must round twice, as torch's separate ops do (the
# kernels ask for fused multiply-adds explicitly where they want them).
FLAGS = ("-O3", "-mtune=native", "-std=c++17", "-fopenmp", "-fPIC", "-fno-math-errno", "-ffp-contract=off")
_AVX2 = ("-mavx2", "-mfma", "-mf16c")
_AVX512 = (*_AVX2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq")
# Each build's instruction-set flags (the names are CpuFeatures.kernel_isa's), best first.
ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "avx512_bf16": (*_AVX512, "-mavx512bf16"),
    "avx512": _AVX512,
    "avx2": _AVX2,
}
DISABLE_ENV = "ELASTIC_ENGINE_NATIVE_KERNELS"


@functools.cache
def load(isa: str | None = None) -> ctypes.CDLL | None:
    """The library of build `isa` (default: the best this CPU runs under the mask), or None when
    this machine cannot have it (said once in the log)."""
    if isa is not None and isa not in ISA_FLAGS:
        raise ValueError(f"unknown native kernel build {isa!r}: expected one of {', '.join(ISA_FLAGS)}")
    if os.environ.get(DISABLE_ENV, "1") == "0":
        logger.info("native CPU kernels off (%s=0): using the torch path", DISABLE_ENV)
        return None
    if isa is None:
        isa = cpu_features().kernel_isa
        if isa is None:
            logger.info("native CPU kernels need AVX2, FMA and F16C (%s): using the torch path",
                        cpu_features().describe())
            return None
        return load(isa)
    if isa not in cpu_features().kernel_isas:
        logger.info("native CPU kernels: this CPU cannot run the %s build (%s)", isa, cpu_features().describe())
        return None
    return _open(isa)


def entry_points(library: ctypes.CDLL | None, declare: Callable[[ctypes.CDLL], T]) -> T | None:
    """`declare(library)` (a kernel module's signatures) on the given build, or on the one `load`
    picks; None when no library loads."""
    library = load() if library is None else library
    return None if library is None else declare(library)


def active_isa() -> str | None:
    """The build the engine's kernels use ('avx512_bf16', 'avx512', 'avx2'), or None when they run
    the torch path: for the start-up log line."""
    return cpu_features().kernel_isa if load() is not None else None


def open_file(path: str | Path) -> ctypes.CDLL:
    """A library file as it stands (another commit's build, for a benchmark's A/B), its kernels
    declared; its ISA is what it reports.  Raises OSError when it does not load."""
    library = ctypes.CDLL(str(path))
    library.engine_cpu_kernel_isa.restype = ctypes.c_char_p
    _declare_signatures(library)
    return library


def _open(isa: str) -> ctypes.CDLL | None:
    """Build `isa` (from the cache, or compiled now), loaded and checked; None after a log line."""
    try:
        library = ctypes.CDLL(str(_built_library(isa)))
    except (OSError, subprocess.CalledProcessError, FileNotFoundError) as error:
        logger.warning("native CPU kernels (%s build) unavailable, using the torch path: %s", isa, error)
        return None
    library.engine_cpu_kernel_isa.restype = ctypes.c_char_p
    if library.engine_cpu_kernel_isa() != isa.encode():  # the flags did not enable what simd.h looks for
        logger.warning("native CPU kernels: the %s build compiled as %r: using the torch path", isa,
                       library.engine_cpu_kernel_isa())
        return None
    _declare_signatures(library)
    return library


def _built_library(isa: str) -> Path:
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise FileNotFoundError("no C++ compiler (g++, or $CXX) on PATH")
    flags = (*FLAGS, *ISA_FLAGS[isa])
    path = _cache_dir() / f"libengine_cpu_{isa}_{_build_key(compiler, flags)}.so"
    if not path.exists():
        _compile(compiler, flags, path)
    return path


def _sources() -> list[Path]:
    """Every .cpp here (each compiles, to a stub if need be, under every build's flags)."""
    return sorted(KERNEL_DIR.glob("*.cpp"))


def _build_key(compiler: str, flags: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for source in _sources() + sorted(KERNEL_DIR.glob("*.h")):
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    digest.update("\0".join((compiler, version, *flags)).encode())
    return digest.hexdigest()[:16]


def _cache_dir() -> Path:
    directory = cache_root() / "kernels"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _compile(compiler: str, flags: tuple[str, ...], path: Path) -> None:
    """Compile the sources side by side (one process each: about half the time on two cores), link,
    then rename into place: processes building at once never load a half written file, and the
    last rename wins with an identical library."""
    logger.info("building native CPU kernels (once per machine and build): %s", path)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        sources = _sources()
        objects = [str(Path(scratch) / f"{source.stem}.o") for source in sources]
        compiles = [subprocess.Popen([compiler, *flags, "-c", str(source), "-o", obj], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
                    for source, obj in zip(sources, objects)]
        finished = [(process, process.communicate()[1]) for process in compiles]  # all done before any raise
        for process, stderr in finished:
            if process.returncode != 0:
                raise OSError(f"{compiler} failed: {stderr.strip()[-2000:]}")
        partial = Path(scratch) / path.name
        result = subprocess.run([compiler, *flags, "-shared", *objects, "-o", str(partial)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise OSError(f"{compiler} failed to link: {result.stderr.strip()[-2000:]}")
        os.replace(partial, path)


def _declare_signatures(library: ctypes.CDLL) -> None:
    """Argument types of every kernel (see each .cpp's extern "C" function); all return 0 or -1."""
    pointer, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    signatures = {
        # query, query_stride, key_cache, value_cache, block_tables, block_table_stride, seq_lens,
        # group_heads, out, num_seqs, num_q_heads, num_kv_heads, head_dim, block_size, scale, dtype, threads,
        # rank_major, kv_int8
        "paged_decode_attention": [pointer, i64, pointer, pointer, pointer, i64, pointer, pointer, pointer,
                                   i32, i32, i32, i32, i32, f32, i32, i32, i32, i32],
        # x, x_stride, residual, weight, out, rows, hidden, eps, dtype, threads
        "rms_norm": [pointer, i64, pointer, pointer, pointer, i64, i64, f32, i32, i32],
        # x, tokens, heads, head_dim, token_stride, cos, sin, dtype, threads
        "rotary_embedding": [pointer, i64, i64, i64, i64, pointer, pointer, i32, i32],
        # x, x_stride, out, out_stride, tokens, n, dtype, threads
        "silu_and_mul": [pointer, i64, pointer, i64, i64, i64, i32, i32],
    }
    for name, argtypes in signatures.items():
        function = getattr(library, name)
        function.argtypes = argtypes
        function.restype = i32
