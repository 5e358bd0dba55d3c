"""Our OpenAI server (`python -m engine.api.server`) in a subprocess on a free loopback port, as
the benchmarks that compare it with its peers start it: one sequence slot per stream, quiet logs,
otherwise at the engine's defaults.  `engine_setup_from_log` reads back, from the server's log,
the dtype and weight format the engine resolved ("auto" becomes a concrete choice at load)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from peers.llama_server import ServerProcess, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
# LLMEngine's start-up line: "engine ready: model=... dtype=float32 weights=native max_model_len=..."
ENGINE_READY = re.compile(r"engine ready: model=(?P<model>\S+) dtype=(?P<dtype>\S+) weights=(?P<weight_format>\S+)")


def our_server(*, max_num_seqs: int, dtype: str, max_num_batched_tokens: int | None,
               log_file: Path, weight_format: str = "auto") -> ServerProcess:
    port = free_port()
    command = [sys.executable, "-m", "engine.api.server", "--port", str(port), "--max-num-seqs", str(max_num_seqs),
               "--dtype", dtype, "--weight-format", weight_format, "--disable-log-stats",
               "--uvicorn-log-level", "warning"]
    if max_num_batched_tokens is not None:
        command += ["--max-num-batched-tokens", str(max_num_batched_tokens)]
    return ServerProcess(command, port, log_file, cwd=REPO_ROOT)


def engine_setup_from_log(log_file: Path, dtype: str, weight_format: str) -> dict[str, str | None]:
    """{"dtype", "weight_format"} the server's engine runs with, from its start-up line; where the
    line is missing, what was asked (None for "auto": unknown)."""
    match = ENGINE_READY.search(log_file.read_text(errors="replace")) if log_file.exists() else None
    if match is not None:
        return {"dtype": match["dtype"], "weight_format": match["weight_format"]}
    return {"dtype": None if dtype == "auto" else dtype,
            "weight_format": None if weight_format == "auto" else weight_format}
