"""A real server process on loopback (`python -m engine.api.server`) with the default model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_NAME = "SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 1024
STARTUP_TIMEOUT_S = 240.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *extra_args: str, env: dict[str, str] | None = None, module: str = "engine.api.server") -> None:
        """`env`: variables added to this environment for the server (a fault to inject, say).
        `module`: engine.cli for `engine serve` itself (its --replicas)."""
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"engine-serve-{self.port}.log"
        self._log = open(self.log_path, "wb")
        command = ["engine.cli", "serve"] if module == "engine.cli" else [module]
        args = [sys.executable, "-m", *command, "--port", str(self.port),
                "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", "0.25",
                "--uvicorn-log-level", "warning", *extra_args]
        self.process = subprocess.Popen(args, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=None if env is None else {**os.environ, **env})

    def wait_ready(self) -> None:
        wait_healthy(self.base_url, {self.process: self.log_path})


    def log(self) -> str:
        return _tail(self.log_path)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


def wait_healthy(base_url: str, processes: dict[subprocess.Popen, Path],
                 timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Until `base_url`/health answers 200; a process that exits first (its log's tail in the
    error) or a timeout raises."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for process, log in processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{_tail(log)}")
        try:
            if httpx.get(f"{base_url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"server not healthy after {timeout_s} s:\n{_tail(next(iter(processes.values())))}")


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-5000:]


def running_server(*extra_args: str, env: dict[str, str] | None = None,
                   module: str = "engine.api.server") -> Iterator[ServerProcess]:
    """A fixture body: a server with these flags, healthy for the fixture's scope, then stopped;
    a server that died meanwhile fails the last test that used it."""
    process = ServerProcess(*extra_args, env=env, module=module)
    try:
        process.wait_ready()
        yield process
        assert process.process.poll() is None, f"server died:\n{process.log()}"
    finally:
        process.stop()


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    yield from running_server()


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=120) as http_client:
        yield http_client


def scrape(base_url: str) -> dict[str, float]:
    """/metrics as {'name{labels}': value}, without comments."""
    samples = {}
    for line in httpx.get(f"{base_url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for key, value in samples.items():
        sample_name = key.split("{", 1)[0]
        if sample_name == name and all(f'{k}="{v}"' in key for k, v in labels.items()):
            total += value
    return total
