"""What a CPU engine's start-up and first request import: neither Triton (with torch._dynamo, which
imports it; ~3 s, and nanobind's leak report at every exit) nor sympy (~0.7 s).  Both came in
through torch's meta-device arithmetic while the model was built (engine/model/loader.py,
engine/model/layers/rotary.py); a fresh interpreter shows whether anything brings them back."""

from __future__ import annotations

import subprocess
import sys

ENGINE_ON_CPU = """
import sys
from engine import LLM, SamplingParams
llm = LLM(kv_cache_memory=0.05)
llm.generate(["Hello there"], SamplingParams(max_tokens=4), use_tqdm=False)
print("imported:", *(name for name in ("triton", "torch._dynamo", "sympy") if name in sys.modules))
"""


def test_a_cpu_engine_builds_and_serves_without_triton_dynamo_or_sympy() -> None:
    done = subprocess.run([sys.executable, "-c", ENGINE_ON_CPU], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.splitlines()[-1] == "imported:"
