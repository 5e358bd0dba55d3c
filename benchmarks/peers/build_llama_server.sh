#!/usr/bin/env bash
# Build llama.cpp's llama-server from the llama-cpp-python sdist on PyPI, as the
# peer for benchmarks/serve_throughput.py. Sources and binary are cached outside
# the repository and never committed.
#
#   benchmarks/peers/build_llama_server.sh              # prints the path of llama-server
#   benchmarks/peers/build_llama_server.sh --isa avx2   # an AVX2-only build beside it
#   benchmarks/peers/build_llama_server.sh --isa avx512 # AVX-512 (VNNI, BF16, VBMI) without AMX
#
# The default build is tuned to this CPU (-DGGML_NATIVE=ON) in llama.cpp/build. `--isa avx2`
# (or LLAMA_SERVER_ISA=avx2) builds a second binary in llama.cpp/build-avx2 limited to AVX2, FMA
# and F16C: the peer benchmarks/peers/llama_server.py runs when ELASTIC_ENGINE_CPU_ISA=avx2 caps
# our engine, so that a masked run compares like with like. `--isa avx512` (llama.cpp/build-avx512)
# is the native build's instruction set without AMX: on a Sapphire Rapids VM the native build
# (llama-cpp-python 0.3.36) dies with SIGSEGV right after "llama threadpool init", while this one
# runs: pass `--llama-server <cache>/llama.cpp/build-avx512/bin/llama-server` to the benchmarks there.
#
# Environment: LLAMA_SERVER_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/elastic-engine/llama-server),
# LLAMA_SERVER_ISA (native, avx512 or avx2; default native), PIP (default: the repository's .venv/bin/pip,
# else pip), JOBS (default 2).
set -euo pipefail

isa="${LLAMA_SERVER_ISA:-native}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --isa) isa="${2:?--isa needs a value: native or avx2}"; shift 2 ;;
        --isa=*) isa="${1#--isa=}"; shift ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (expected --isa native|avx512|avx2)" >&2; exit 2 ;;
    esac
done

# Every x86 level named (the option names of ggml/CMakeLists.txt), so that neither ggml's defaults
# nor a reused CMake cache adds one. SSE4.2 and BMI2 stay at ggml's default (on without NATIVE),
# as ELASTIC_ENGINE_CPU_ISA=avx2 keeps them.
case "$isa" in
    native)
        build_dir="build"
        isa_flags=(-DGGML_NATIVE=ON) ;;
    avx2)
        build_dir="build-avx2"
        isa_flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
                   -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF
                   -DGGML_AVX_VNNI=OFF) ;;
    avx512)
        build_dir="build-avx512"
        isa_flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
                   -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
                   -DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF) ;;
    *)
        echo "unknown ISA: $isa (expected native, avx512 or avx2)" >&2
        exit 2 ;;
esac

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cache_dir="${LLAMA_SERVER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/elastic-engine/llama-server}"
binary="$cache_dir/llama.cpp/$build_dir/bin/llama-server"
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
echo "building llama-server ($isa) with $jobs jobs in $PWD/$build_dir" >&2
cmake -B "$build_dir" -DLLAMA_BUILD_SERVER=ON "${isa_flags[@]}" -DLLAMA_CURL=OFF \
    -DCMAKE_BUILD_TYPE=Release >&2
cmake --build "$build_dir" --target llama-server -j"$jobs" >&2
echo "$binary"
