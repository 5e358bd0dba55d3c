"""Every kernel compiles for real NVIDIA targets (sm_80, sm_90) without a GPU, within the shared
memory of the smallest of them (sm_86/sm_89: 99 KB per block)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import triton

MAX_SHARED_BYTES = 99 * 1024
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


ARCHES = (80, 90)


@pytest.fixture(scope="module")
def compiling(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, subprocess.Popen]]:
    """One compile per target, all started at once: each is one Python process (~30 s on one core
    here), so on the two-core CI machine they take the time of one.  A subprocess: this one
    imported the kernels under TRITON_INTERPRET, which can't be compiled."""
    script = Path(__file__).with_name("gpu_compile_check.py")
    started = {}
    for arch in ARCHES:
        env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp(f"triton_sm{arch}"))
        started[arch] = subprocess.Popen([sys.executable, str(script), str(arch)], env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)
    yield started
    for process in started.values():
        process.kill()
        process.communicate()


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton build ships no ptxas")
@pytest.mark.parametrize("arch", ARCHES)
def test_kernels_compile_for_nvidia(arch: int, compiling: dict[int, subprocess.Popen]) -> None:
    stdout, stderr = compiling[arch].communicate(timeout=300)
    assert compiling[arch].returncode == 0, stderr[-4000:]
    compiled = [json.loads(line) for line in stdout.splitlines()]
    assert len(compiled) == 28  # 14 launch configurations x (bf16, fp32)
    too_big = [c for c in compiled if c["shared_bytes"] > MAX_SHARED_BYTES]
    assert not too_big, too_big
