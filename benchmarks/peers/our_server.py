"""Our OpenAI server (`python -m engine.api.server`) in a subprocess on a free loopback port, as
the benchmarks that compare it with its peers start it: one sequence slot per stream, quiet logs,
otherwise at the engine's defaults."""

from __future__ import annotations

import sys
from pathlib import Path

from peers.llama_server import ServerProcess, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


def our_server(*, max_num_seqs: int, dtype: str, max_num_batched_tokens: int | None,
               log_file: Path) -> ServerProcess:
    port = free_port()
    command = [sys.executable, "-m", "engine.api.server", "--port", str(port), "--max-num-seqs", str(max_num_seqs),
               "--dtype", dtype, "--disable-log-stats", "--uvicorn-log-level", "warning"]
    if max_num_batched_tokens is not None:
        command += ["--max-num-batched-tokens", str(max_num_batched_tokens)]
    return ServerProcess(command, port, log_file, cwd=REPO_ROOT)
