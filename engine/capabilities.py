"""What this machine can compute: the one capability probe every kernel and weight-format choice asks.

The CPU's features are read once from /proc/cpuinfo (x86 flag names, as the kernel spells them),
then capped by ELASTIC_ENGINE_CPU_ISA, so that an AVX-512 machine can run, and test, the paths
an AVX2-only CPU takes:

    ELASTIC_ENGINE_CPU_ISA   keeps the features of
    ----------------------   --------------------------------------------------------------
    amx                      everything the CPU has (the default)
    avx512_bf16              AVX-512 F/BW/VL/DQ/VNNI, AVX512-BF16, and all of the levels below
    avx512                   AVX-512 F/BW/VL/DQ/VNNI and avx2_vnni's level
    avx2_vnni                AVX2, FMA, F16C and AVX-VNNI (no AVX-512, no AVX-NE-CONVERT)
    avx2                     AVX2, FMA, F16C: what AVX2-only CPUs (AMD Zen 2/3, Intel before
                             Alder Lake) have; no VNNI
    scalar                   none of the above: only the torch path's own baseline

A mask never adds a feature the CPU lacks.  Torch, oneDNN and MKL read the hardware themselves,
so a mask is passed on to them as ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA and
MKL_ENABLE_INSTRUCTIONS (see `library_env`), which `engine.process_env` sets before torch loads.  One library check cannot be capped that
way: torch's bf16 weight prepacking asks the hardware directly, which is why `can_prepack_bf16`
here, and not torch, decides whether the engine calls it.

This module imports no torch: process_env uses it before torch is loaded.  CUDA is the device
the user names (`device="cuda"`), not something probed here.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

MASK_ENV = "ELASTIC_ENGINE_CPU_ISA"

# Each level names the flags it adds to the one below it.
_LEVELS: dict[str, frozenset[str]] = {
    "scalar": frozenset(),
    "avx2": frozenset({"avx", "avx2", "fma", "f16c"}),
    "avx2_vnni": frozenset({"avx_vnni"}),
    "avx512": frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512_vnni"}),
    "avx512_bf16": frozenset({"avx512_bf16"}),
    "amx": frozenset({"amx_bf16", "amx_tile", "amx_int8", "avx_ne_convert"}),
}
ISA_LEVELS = tuple(_LEVELS)
_ALL_LEVEL_FLAGS = frozenset().union(*_LEVELS.values())

# What the kernels and the libraries' choices look at, in the order the start-up line lists them.
REPORTED_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
                     "avx512_bf16", "amx_bf16", "avx_ne_convert", "avx_vnni")


class CapabilityError(ValueError):
    """ELASTIC_ENGINE_CPU_ISA names no known level."""


@dataclass(frozen=True)
class CpuFeatures:
    """The CPU features the engine may use: the hardware's, capped by the mask."""

    flags: frozenset[str]
    mask: str | None = None  # the ELASTIC_ENGINE_CPU_ISA level in force, if any

    def has(self, *names: str) -> bool:
        return all(name in self.flags for name in names)

    @property
    def has_avx2(self) -> bool:
        """AVX2 with FMA and F16C: what the AVX2 build of the C++ kernels needs."""
        return self.has("avx2", "fma", "f16c")

    @property
    def has_avx512(self) -> bool:
        """AVX-512 F, BW, VL and DQ: what the AVX-512 build of the C++ kernels needs."""
        return self.has_avx2 and self.has("avx512f", "avx512bw", "avx512vl", "avx512dq")

    @property
    def computes_bf16(self) -> bool:
        """bf16 dot products in hardware (AVX512-BF16 or AMX): bf16 GEMMs run at least at fp32 speed."""
        return self.has("avx512_bf16") or self.has("amx_bf16")

    @property
    def can_prepack_bf16(self) -> bool:
        """oneDNN's bf16 linear prepacking needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT (torch raises
        otherwise, reading the hardware and not the mask: so the engine asks here first)."""
        return self.has("avx512bw", "avx512vl", "avx512dq") or self.has("avx_ne_convert")

    @property
    def kernel_isa(self) -> str | None:
        """The best build of the C++ kernels this CPU runs: 'avx512_bf16', 'avx512', 'avx2', or None."""
        if self.has_avx512:
            return "avx512_bf16" if self.has("avx512_bf16") else "avx512"
        return "avx2" if self.has_avx2 else None

    @property
    def kernel_isas(self) -> tuple[str, ...]:
        """Every build of the C++ kernels this CPU runs, best first (the tests run each)."""
        order = ("avx512_bf16", "avx512", "avx2")
        best = self.kernel_isa
        return () if best is None else order[order.index(best):]

    @property
    def has_vnni(self) -> bool:
        """Byte dot products into int32 (vpdpbusd) for the kernel build in use: AVX512-VNNI for
        the AVX-512 builds, AVX-VNNI for the AVX2 build."""
        return self.has("avx512_vnni") if self.has_avx512 else self.has_avx2 and self.has("avx_vnni")

    def describe(self) -> str:
        present = [name for name in REPORTED_FEATURES if name in self.flags]
        masked = f" (masked to {self.mask} by {MASK_ENV})" if self.mask else ""
        return f"{platform.machine()} {cpu_model_name()}: {' '.join(present) or 'no SIMD features'}{masked}"


def parse_mask(value: str | None) -> str | None:
    """The level named by ELASTIC_ENGINE_CPU_ISA, or None when unset or empty."""
    if value is None or not value.strip():
        return None
    level = value.strip().lower()
    if level not in _LEVELS:
        raise CapabilityError(f"{MASK_ENV}={value!r}: expected one of {', '.join(ISA_LEVELS)}")
    return level


def apply_mask(flags: frozenset[str], level: str | None) -> frozenset[str]:
    """Drop every level flag above `level`; flags no level names (sse4_2, ...) stay."""
    if level is None:
        return flags
    allowed: set[str] = set()
    for name, added in _LEVELS.items():
        allowed |= added
        if name == level:
            break
    return frozenset(f for f in flags if f in allowed or f not in _ALL_LEVEL_FLAGS)


@functools.cache
def cpu_features() -> CpuFeatures:
    """This machine's features under the mask in the environment (read once per process)."""
    mask = parse_mask(os.environ.get(MASK_ENV))
    return CpuFeatures(apply_mask(_hardware_flags(), mask), mask)


def _hardware_flags() -> frozenset[str]:
    for line in _cpuinfo_lines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_model_name() -> str:
    for line in _cpuinfo_lines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


@functools.cache
def _cpuinfo_lines() -> tuple[str, ...]:
    try:
        return tuple(Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        return ()


def library_env(features: CpuFeatures) -> dict[str, str]:
    """ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA and MKL_ENABLE_INSTRUCTIONS that keep torch's,
    oneDNN's and MKL's own kernels within the mask; empty when no mask is set (the libraries then
    pick the hardware's best).  Without the MKL cap, torch's fp32 GEMMs under an AVX2 mask still
    ran MKL's AVX-512 code (MKL_VERBOSE says which)."""
    if features.mask is None:
        return {}
    if features.has_avx512:
        aten, mkl = "avx512", "AVX512"
        onednn = ("AVX512_CORE_AMX" if features.has("amx_bf16") else
                  "AVX512_CORE_BF16" if features.has("avx512_bf16") else
                  "AVX512_CORE_VNNI" if features.has("avx512_vnni") else "AVX512_CORE")
    elif features.has_avx2:
        aten, mkl, onednn = "avx2", "AVX2", ("AVX2_VNNI" if features.has("avx_vnni") else "AVX2")
    else:
        aten, mkl, onednn = "default", "SSE4_2", "SSE41"
    return {"ATEN_CPU_CAPABILITY": aten, "ONEDNN_MAX_CPU_ISA": onednn, "MKL_ENABLE_INSTRUCTIONS": mkl}


@functools.cache
def log_capabilities() -> None:
    """One start-up line saying what the kernel choices will be based on."""
    logger.info("CPU: %s", cpu_features().describe())
