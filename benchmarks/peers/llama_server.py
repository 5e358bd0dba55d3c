"""llama.cpp's `llama-server` on loopback, serving the engine's default GGUF, as a benchmark peer.

`build_llama_server.sh` builds the binary into a cache outside the repository; this module finds
it there, starts it with one slot per concurrent stream, waits for /health and stops it on exit.
llama.cpp reads the CPU itself, so ELASTIC_ENGINE_CPU_ISA cannot cap it: with the mask at avx2
the benchmarks run the AVX2-only build (`build_llama_server.sh --isa avx2`) instead, so that a
masked run compares like with like.

    .venv/bin/python benchmarks/peers/llama_server.py --port 8081   # serve until Ctrl-C

In a benchmark:

    with LlamaServer(binary, model_file, num_slots=32, num_threads=2, ctx_size=32 * 1152) as server:
        ...  # POST f"{server.url}/v1/completions"

`ctx_size` is the KV cache of all slots together: llama-server gives each slot ctx_size / num_slots
tokens, so pass num_slots * (longest prompt + output length).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

HEALTH_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0


def default_cache_dir() -> Path:
    """Where build_llama_server.sh keeps sources and binary (the same default as the script)."""
    if "LLAMA_SERVER_CACHE" in os.environ:
        return Path(os.environ["LLAMA_SERVER_CACHE"])
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache_home / "elastic-engine" / "llama-server"


# ELASTIC_ENGINE_CPU_ISA level -> the build directory of the llama.cpp build limited to it.
BUILD_DIRS = {"avx2": "build-avx2"}


def default_binary() -> Path:
    """The build for the ISA mask in force (ELASTIC_ENGINE_CPU_ISA), else the native build."""
    from engine.capabilities import cpu_features

    build_dir = BUILD_DIRS.get(cpu_features().mask or "", "build")
    return default_cache_dir() / "llama.cpp" / build_dir / "bin" / "llama-server"


# build_llama_server.sh --isa ISA -> its build directory (avx512: the native set without AMX).
BUILD_SCRIPT_DIRS = {**BUILD_DIRS, "avx512": "build-avx512"}


def build_command(binary: Path) -> str:
    """The command that builds `binary` where it is one of build_llama_server.sh's builds."""
    isa = next((isa for isa, build_dir in BUILD_SCRIPT_DIRS.items() if binary.parent.parent.name == build_dir), None)
    return "benchmarks/peers/build_llama_server.sh" + (f" --isa {isa}" if isa else "")


def free_port() -> int:
    """A loopback port nobody listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(url: str, process: subprocess.Popen[bytes], timeout_s: float = HEALTH_TIMEOUT_S) -> None:
    """Poll GET {url}/health until 200; raise if the process exits or the timeout passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # not listening yet, or 503 while the model loads
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout_s:.0f} s")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within STOP_TIMEOUT_S."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class ServerProcess:
    """A server process on a loopback port for the length of a `with` block: started, waited on
    until /health answers, stopped on exit.  Subclasses only build the command."""

    def __init__(self, command: list[str], port: int, log_file: Path | None = None, cwd: Path | None = None) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.command = command
        self.log_file = log_file
        self.cwd = cwd
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServerProcess:
        log = open(self.log_file, "wb") if self.log_file is not None else subprocess.DEVNULL
        try:
            self._process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd)
        finally:
            if log is not subprocess.DEVNULL:
                log.close()  # the child holds its own descriptor
        try:
            wait_until_healthy(self.url, self._process)
        except BaseException:
            stop_process(self._process)
            raise
        return self

    @property
    def pid(self) -> int:
        assert self._process is not None, "not started"
        return self._process.pid

    def wait(self) -> None:
        """Block until the server exits (it runs until stopped)."""
        if self._process is not None:
            self._process.wait()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._process is not None:
            stop_process(self._process)


class LlamaServer(ServerProcess):
    """llama.cpp's llama-server on the given GGUF."""

    def __init__(self, binary: Path, model_file: Path, *, num_slots: int, num_threads: int, ctx_size: int,
                 port: int | None = None, log_file: Path | None = None) -> None:
        port = port or free_port()
        super().__init__([
            str(binary), "--model", str(model_file), "--host", "127.0.0.1", "--port", str(port),
            "--parallel", str(num_slots), "--ctx-size", str(ctx_size),
            "--threads", str(num_threads), "--threads-batch", str(num_threads),
            "--cont-batching", "--no-webui",
        ], port, log_file)


def add_llama_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every benchmark that runs llama-server as a peer takes."""
    parser.add_argument("--llama-server", type=Path, default=default_binary(),
                        help="llama-server binary (default: the build for ELASTIC_ENGINE_CPU_ISA=avx2 "
                             "when that is set, else the native build)")
    parser.add_argument("--llama-threads", type=int, default=os.cpu_count() or 1, help="llama-server -t and -tb")
    parser.add_argument("--skip-llama-server", action="store_true")


def llama_server_from_args(args: argparse.Namespace, *, num_slots: int, ctx_size: int,
                           log_file: Path) -> LlamaServer | None:
    """The peer those flags ask for, or None (with a message) when skipped or not built."""
    if args.skip_llama_server:
        return None
    if not args.llama_server.exists():
        print(f"\nSKIPPED llama-server: {args.llama_server} does not exist; "
              f"build it with {build_command(args.llama_server)} (about ten minutes on two cores)")
        return None
    warn_if_unmasked(args.llama_server)
    from engine.model.loader import default_model_path
    return LlamaServer(args.llama_server, default_model_path(), num_slots=num_slots, num_threads=args.llama_threads,
                       ctx_size=ctx_size, log_file=log_file)


def warn_if_unmasked(binary: Path) -> None:
    """Say so when the engine runs under an ISA mask that this llama-server build ignores."""
    from engine.capabilities import MASK_ENV, cpu_features

    mask = cpu_features().mask
    if mask is not None and binary.parent.parent.name != BUILD_DIRS.get(mask):
        print(f"WARNING: {MASK_ENV}={mask} caps our engine but not {binary}, which uses every feature "
              f"it was built for (build_llama_server.sh --isa builds: {', '.join(BUILD_DIRS)})")


def llama_server_version(binary: Path) -> str:
    """`llama-server --version`, plus the sdist it was built from where build_llama_server.sh noted it."""
    done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    version = " ".join((done.stdout + done.stderr).split())
    source = binary.parents[2] / "SOURCE"  # llama.cpp/build/bin/llama-server -> llama.cpp/SOURCE
    return f"{version}; source {source.read_text().strip()}" if source.exists() else version


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the engine's default GGUF with llama-server until Ctrl-C.")
    parser.add_argument("--binary", type=Path, default=default_binary())
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: the engine's default model)")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--num-slots", type=int, default=32, help="llama-server -np")
    parser.add_argument("--threads", type=int, default=2, help="llama-server -t and -tb")
    parser.add_argument("--ctx-size", type=int, default=32 * (1024 + 128), help="tokens, all slots together")
    args = parser.parse_args()
    if not args.binary.exists():
        parser.error(f"{args.binary} does not exist: run {build_command(args.binary)}")
    if args.model is None:
        from engine.model.loader import default_model_path
        args.model = default_model_path()
    with LlamaServer(args.binary, args.model, num_slots=args.num_slots, num_threads=args.threads,
                     ctx_size=args.ctx_size, port=args.port) as server:
        print(f"llama-server ready on {server.url}; Ctrl-C stops it")
        try:
            server.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
