#!/usr/bin/env bash
# Build llama.cpp's llama-server from the llama-cpp-python sdist on PyPI, as the
# peer for benchmarks/serve_throughput.py. Sources and binary are cached outside
# the repository and never committed.
#
#   benchmarks/peers/build_llama_server.sh   # prints the path of llama-server
#
# Environment: LLAMA_SERVER_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/elastic-engine/llama-server),
# PIP (default: the repository's .venv/bin/pip, else pip), JOBS (default 2).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cache_dir="${LLAMA_SERVER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/elastic-engine/llama-server}"
binary="$cache_dir/llama.cpp/build/bin/llama-server"
jobs="${JOBS:-2}"

if [[ -x "$binary" ]]; then
    echo "$binary"
    exit 0
fi

pip="${PIP:-$repo_root/.venv/bin/pip}"
[[ -x "$pip" ]] || pip="pip"

mkdir -p "$cache_dir"
if [[ ! -d "$cache_dir/llama.cpp" ]]; then
    download_dir="$(mktemp -d)"
    trap 'rm -rf "$download_dir"' EXIT
    echo "downloading the llama-cpp-python sdist into $download_dir" >&2
    "$pip" download --no-deps --no-binary :all: --dest "$download_dir" llama-cpp-python >&2
    sdist="$(ls "$download_dir"/llama_cpp_python-*.tar.gz | head -n 1)"
    tar -xzf "$sdist" -C "$download_dir"
    # The sdist vendors llama.cpp; keep only that tree.
    mv "$download_dir"/llama_cpp_python-*/vendor/llama.cpp "$cache_dir/llama.cpp.partial"
    mv "$cache_dir/llama.cpp.partial" "$cache_dir/llama.cpp"
    # llama-server --version says "commit unknown" when built from an sdist: remember which one.
    basename "$sdist" > "$cache_dir/llama.cpp/SOURCE"
fi

cd "$cache_dir/llama.cpp"
echo "building llama-server with $jobs jobs in $PWD/build" >&2
cmake -B build -DLLAMA_BUILD_SERVER=ON -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DCMAKE_BUILD_TYPE=Release >&2
cmake --build build --target llama-server -j"$jobs" >&2
echo "$binary"
