"""Every kernel compiles for real NVIDIA targets (sm_80, sm_90) without a GPU, within the shared
memory of the smallest of them (sm_86/sm_89: 99 KB per block)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

MAX_SHARED_BYTES = 99 * 1024
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton build ships no ptxas")
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_nvidia(arch: int, tmp_path: Path) -> None:
    # A subprocess: this one imported the kernels under TRITON_INTERPRET, which can't be compiled.
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    script = Path(__file__).with_name("gpu_compile_check.py")
    result = subprocess.run([sys.executable, str(script), str(arch)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    compiled = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(compiled) == 28  # 14 launch configurations x (bf16, fp32)
    too_big = [c for c in compiled if c["shared_bytes"] > MAX_SHARED_BYTES]
    assert not too_big, too_big
