"""The soak of benchmarks/soak.py, shortened: mixed, hostile traffic (streams and not, chat and
completions, n up to 4, disconnects, malformed bodies) against a live server whose small KV budget
forces preemptions (under mlfq).  Zero 5xx, nothing lost, idle afterwards with the KV invariants
checked at every idle moment, no descriptor or thread growth (memory growth needs the long run)."""

from __future__ import annotations

import asyncio

import pytest

from engine.bench.soak import SoakConfig, plan_requests, run_soak

from .conftest import metric, running_server, scrape

PROMPTS = ["Write a haiku about the sea.", "Explain what a hash table is.", "List three uses of copper.",
           "Translate 'good morning' into French and Spanish.", "What is the capital of Australia? Answer briefly."]
# Two policies here (the benchmark runs all four): mlfq's queues and the slo policy's admission.
POLICY_FLAGS = {"mlfq": [], "slo": ["--slo-ttft-ms", "4000", "--slo-tpot-ms", "250", "--slo-best-effort"]}


@pytest.mark.parametrize("policy", list(POLICY_FLAGS))
def test_short_soak(policy: str) -> None:
    for server in running_server("--scheduling-policy", policy, "--kv-cache-memory", "0.008", "--max-model-len",
                                 "512", "--check-invariants", *POLICY_FLAGS[policy]):
        config = SoakConfig(num_requests=60, rate=5.0, max_tokens=48, seed=7)
        planned = plan_requests(config, PROMPTS)
        assert {p.kind for p in planned} == {"ok", "disconnect", "malformed"}
        report = asyncio.run(run_soak(server.base_url, server.process.pid, planned, sample_every_s=0.5,
                                      check_memory=False))
        assert not report.failures, report.summary()
        samples = scrape(server.base_url)
        if policy != "slo":  # slo admits by predicted TPOT, which here keeps the batch within the KV budget
            assert metric(samples, "engine:num_preemptions_total") > 0  # the KV budget was tight enough
        assert metric(samples, "engine:invariant_checks_total") > 0
        assert metric(samples, "engine:invariant_violations_total") == 0
