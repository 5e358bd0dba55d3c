"""torchrun starts the tensor-parallel ranks, as it would on several nodes: two launchers on
loopback, one "node" each (--nnodes 2), run the same `engine serve --tensor-parallel-size 2`.
Rank 0 becomes the engine and the HTTP server, rank 1 holds the other half of every weight and
of the KV heads; greedy completions over HTTP equal one process's (fp32), and stopping the
server stops both nodes' processes cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from engine import SamplingParams
from tests.api.conftest import REPO_ROOT, free_port, wait_healthy
from tests.conftest import make_llm
from tests.worker.test_tensor_parallel import PLAIN_FP32, sharegpt_prompts

SERVE_FP32 = ["--dtype", "float32", "--weight-format", "dequantized", "--elastic", "off", "--kv-cache-memory", "0.5",
              "--max-num-batched-tokens", "64", "--max-model-len", "1024", "--uvicorn-log-level", "warning"]


def launch_node(node_rank: int, master_port: int, http_port: int, log_path: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(master_port),
               "-m", "engine.cli", "serve", "--tensor-parallel-size", "2", "--port", str(http_port), *SERVE_FP32]
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)


def children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the server process through /proc")
def test_two_torchrun_nodes_serve_one_process_greedy_tokens(tmp_path):
    one_process = make_llm(**PLAIN_FP32)
    prompts = sharegpt_prompts(one_process.get_tokenizer(), 4, 8, 200)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    expected = [output.outputs[0].text for output in one_process.generate(prompts, params, use_tqdm=False)]

    master_port, http_port = free_port(), free_port()
    logs = [tmp_path / f"node{rank}.log" for rank in range(2)]
    nodes = [launch_node(rank, master_port, http_port, logs[rank]) for rank in range(2)]
    try:
        base_url = f"http://127.0.0.1:{http_port}"
        wait_healthy(base_url, dict(zip(nodes, logs)))
        response = httpx.post(f"{base_url}/v1/completions", timeout=120,
                              json={"model": "SmolLM2-135M-Instruct", "prompt": prompts, "max_tokens": 24,
                                    "temperature": 0.0, "ignore_eos": True})
        assert response.status_code == 200, response.text
        choices = sorted(response.json()["choices"], key=lambda choice: choice["index"])
        assert [choice["text"] for choice in choices] == expected

        # Stopping the server (rank 0, torchrun's worker on node 0) broadcasts STOP: rank 1 leaves
        # its loop, and both launchers see their worker succeed.
        (server_pid,) = children(nodes[0].pid)
        os.kill(server_pid, signal.SIGTERM)
        for node, log in zip(nodes, logs):
            assert node.wait(timeout=90) == 0, log.read_text()[-4000:]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()


@pytest.mark.parametrize("rank", [0, 1])
def test_a_world_size_other_than_the_tensor_parallel_size_is_refused_on_every_rank(rank):
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    done = subprocess.run([sys.executable, "-m", "engine.cli", "generate", "Hi", "--tensor-parallel-size", "1"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "torchrun started 2 ranks for --tensor-parallel-size 1" in done.stderr
    assert "Traceback" not in done.stderr
