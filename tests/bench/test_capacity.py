"""Capacity planning by simulation: the H100 roofline profiles scale as TP says, and the plan is
the fewest accelerators whose simulated replicas meet the SLO attainment target."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.bench.capacity import Candidate, PlanRow, best, h100_llama3_70b_profiles, llama3_70b_h100, plan
from engine.bench.simulate import SimConfig
from tests.bench.test_simulate import trace


def test_more_tensor_parallel_gpus_make_steps_cheaper_and_hold_more_kv():
    profiles = [llama3_70b_h100(tp) for tp in (2, 4, 8)]
    overheads = [p.coefficients.overhead_s for p in profiles]
    assert overheads[0] > overheads[1] > overheads[2] > 0
    assert profiles[0].num_kv_blocks < profiles[1].num_kv_blocks < profiles[2].num_kv_blocks
    assert [p.tensor_parallel_size for p in profiles] == [2, 4, 8]
    with pytest.raises(ValueError, match="does not fit 1 H100"):
        llama3_70b_h100(1)


def test_the_plan_is_the_fewest_gpus_meeting_the_target():
    rows = [PlanRow(Candidate("a", 2, 1), 0.5, 1.0, 100.0, None, None),
            PlanRow(Candidate("a", 2, 2), 0.95, 3.0, 200.0, None, None),
            PlanRow(Candidate("b", 4, 1), 0.97, 3.5, 200.0, None, None),
            PlanRow(Candidate("b", 8, 1), 0.99, 5.0, 300.0, None, None)]
    assert best(rows, 0.9).candidate == Candidate("b", 4, 1)  # 4 GPUs either way: the higher goodput
    assert best(rows, 0.999) is None


def test_simulated_replicas_meet_slos_a_single_one_misses():
    requests = trace(300, request_rate=40.0)
    base = SimConfig(slo_ttft_ms=2000, slo_tpot_ms=60)
    rows = plan(requests, base, {"llama3-70b-h100-tp4": h100_llama3_70b_profiles()["llama3-70b-h100-tp4"]}, 8)
    attainment = {row.candidate.num_replicas: row.slo_attainment for row in rows}
    assert set(attainment) == {1, 2}
    assert attainment[2] >= attainment[1]


def test_engine_bench_simulate_plans_from_the_command_line():
    result = subprocess.run([sys.executable, "-m", "engine.cli", "bench", "simulate", "--plan-gpus", "8",
                             "--dataset", "random", "--random-input-len", "256", "--random-output-len", "64",
                             "--num-prompts", "60", "--request-rate", "8", "--slo-ttft-ms", "1000",
                             "--slo-tpot-ms", "50"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| llama3-70b-h100-tp8 | 8 | 1 | 8 |" in result.stdout
    assert "Plan: " in result.stdout or "No candidate meets" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "engine.cli", "bench", "simulate", "--plan-gpus", "8"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "needs --slo-ttft-ms" in bad.stderr
