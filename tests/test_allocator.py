"""`engine serve` re-executes itself on tcmalloc or jemalloc where one is installed (engine/allocator.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from engine.allocator import ALLOCATOR_ENV, find_allocator

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAM = """
import os, sys
from engine.allocator import allocator_in_use, reexec_on_fast_allocator
print("before", os.getpid(), allocator_in_use(), sys.argv[1:], flush=True)
reexec_on_fast_allocator()
print("after", os.getpid(), allocator_in_use(), sys.argv[1:], flush=True)
"""


def run(env_overrides: dict[str, str]) -> list[list[str]]:
    env = {key: value for key, value in os.environ.items() if key not in ("LD_PRELOAD", ALLOCATOR_ENV)}
    result = subprocess.run([sys.executable, "-c", PROGRAM, "--an-argument", "kept"], cwd=REPO_ROOT,
                            env={**env, **env_overrides}, capture_output=True, text=True, check=True, timeout=60)
    return [line.split(" ", 3) for line in result.stdout.splitlines()]


@pytest.mark.skipif(find_allocator() is None, reason="neither tcmalloc nor jemalloc is installed "
                                                      "(scripts/setup.sh installs tcmalloc where it can)")
def test_the_process_reexecutes_once_on_the_allocator_with_its_pid_and_arguments() -> None:
    lines = run({})
    # The first process ends in exec; the second runs the program again on the new malloc and stays.
    assert [line[0] for line in lines] == ["before", "before", "after"]
    assert len({line[1] for line in lines}) == 1  # one PID throughout
    assert lines[0][2] == "system" and lines[1][2] == lines[2][2] in ("tcmalloc", "jemalloc")
    assert all(line[3] == "['--an-argument', 'kept']" for line in lines)


def test_system_keeps_glibc_malloc() -> None:
    lines = run({ALLOCATOR_ENV: "system"})
    assert [(line[0], line[2]) for line in lines] == [("before", "system"), ("after", "system")]
