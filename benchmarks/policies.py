"""Scheduling policies on the real model: ShareGPT with Poisson arrivals at fractions of capacity.

One run measures, in this process, on the default model (bf16):

1. capacity: the trace's requests/s under FCFS with every request arriving at once;
2. for each load (default 50, 80, 100 and 130% of capacity) and each policy (fcfs, priority, mlfq,
   slo): the same trace replayed open-loop (engine.bench.replay) -> mean and p99 TTFT, TPOT and
   job completion time (arrival to last token), SLO attainment and goodput (TTFT and TPOT targets
   sent with every request; only the slo policy schedules by them);
3. chunked prefill (budget --max-num-batched-tokens) against unchunked (budget = the context
   window, so a prompt is prefilled in one step) at --chunked-load: p99 inter-token latency;
4. prefix caching on against off: TTFT with a --shared-prefix-len-token shared system prompt;
5. the simulator (engine bench simulate) on the same traces with a cost model fitted on this run's
   FCFS steps: does it rank the policies as the real runs do?

Output lengths are the reference answers' (heavy-tailed), capped at --max-output-len.  Priorities
for the priority policy are drawn at random (0 or 1), so that policy is measured, not favoured.

    .venv/bin/python benchmarks/policies.py                              # about 35 minutes here
    .venv/bin/python benchmarks/policies.py --num-prompts 24 --loads 1.0 --skip-chunked --skip-prefix  # quick

Writes --out.json (every summary), --out.md (tables) and --out.png (metrics against load).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from engine.bench.arrivals import arrival_times
from engine.bench.datasets import sample_long, sample_sharegpt
from engine.bench.metrics import RequestRecord, summarize
from engine.bench.replay import TraceRequest, replay_trace
from engine.bench.simulate import SimConfig, SimRequest, simulate
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, SLOConfig
from engine.llm_engine import LLMEngine
from engine.request import SLOTarget
from engine.profiling import StepRecorder
from engine.scheduler.cost_model import StepCostModel

REPO_ROOT = Path(__file__).resolve().parent.parent
POLICIES = ("fcfs", "priority", "mlfq", "slo")
# The issue's acceptance points.
MAX_MLFQ_OVER_FCFS_JCT = 0.7
MIN_SLO_OVER_FCFS_GOODPUT = 1.3
MAX_CHUNKED_OVER_UNCHUNKED_P99_ITL = 0.5
MAX_HIT_OVER_MISS_TTFT = 0.3
REPORTED = ("mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "mean_e2el_ms", "p99_e2el_ms",
            "slo_attainment", "request_goodput", "request_throughput", "failed")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=80,
                        help="requests at loads >= 100%%; a load below 100%% sends that fraction of them, so "
                             "every run spans about the same time")
    parser.add_argument("--max-prompt-len", type=int, default=1024)
    parser.add_argument("--max-output-len", type=int, default=512)
    parser.add_argument("--loads", default="0.5,0.8,1.0,1.3", help="fractions of measured capacity")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--max-num-seqs", type=int, default=16,
                        help="seats: few enough that requests queue near capacity, as on a memory-bound GPU")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--slo-ttft-ms", type=float, default=3000.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=250.0)
    parser.add_argument("--chunked-load", type=float, default=0.8)
    parser.add_argument("--long-prompt-len", type=int, default=1536,
                        help="chunking run: every fourth request is a document of this many tokens")
    parser.add_argument("--shared-prefix-len", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-policies", action="store_true")
    parser.add_argument("--skip-chunked", action="store_true")
    parser.add_argument("--skip-prefix", action="store_true")
    parser.add_argument("--only", default=None,
                        help="comma-separated parts to re-run (prefix, policies, chunked, simulate), merged into "
                             "an existing --out.json")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks/results/policies")
    args = parser.parse_args()
    if Path(args.out).suffix:  # out.json, .md and .png are made with with_suffix: "run_1.5x" would lose ".5x"
        parser.error(f"--out is a file stem without an extension, got {args.out}")
    return args


def make_engine(args: argparse.Namespace, policy: str = "fcfs", **scheduler: Any) -> LLMEngine:
    gc.collect()
    prefix_caching = scheduler.pop("enable_prefix_caching", True)
    config = EngineConfig(
        model=ModelConfig(max_model_len=args.max_model_len),
        cache=CacheConfig(enable_prefix_caching=prefix_caching),
        scheduler=SchedulerConfig(max_num_batched_tokens=scheduler.pop("max_num_batched_tokens",
                                                                       args.max_num_batched_tokens),
                                  max_num_seqs=args.max_num_seqs, policy=policy,
                                  slo=SLOConfig(ttft_ms=args.slo_ttft_ms, tpot_ms=args.slo_tpot_ms)))
    return LLMEngine(config)


def base_trace(engine: LLMEngine, args: argparse.Namespace) -> list[TraceRequest]:
    samples = sample_sharegpt(engine.tokenizer, args.num_prompts, seed=args.seed, max_prompt_len=args.max_prompt_len,
                              max_model_len=args.max_model_len, max_output_len=args.max_output_len)
    rng = random.Random(args.seed)
    slo = SLOTarget(ttft_s=args.slo_ttft_ms / 1000, tpot_s=args.slo_tpot_ms / 1000)
    return [TraceRequest(prompt_token_ids=engine.tokenizer.encode(s.prompt), output_len=s.expected_output_len,
                         arrival_time_s=0.0, priority=rng.randint(0, 1), slo=slo) for s in samples]


def at_rate(trace: list[TraceRequest], rate: float, seed: int) -> list[TraceRequest]:
    times = arrival_times(len(trace), rate, 1.0, seed)
    return [replace(request, arrival_time_s=t) for request, t in zip(trace, times)]


def replay_cold(engine: LLMEngine, trace: list[TraceRequest], desc: str) -> tuple[list[RequestRecord], float]:
    engine.kv.reset_prefix_cache()  # every run starts cold
    return replay_trace(engine, trace, desc=desc)


def run(engine: LLMEngine, trace: list[TraceRequest], args: argparse.Namespace, desc: str) -> dict[str, Any]:
    return summarize(*replay_cold(engine, trace, desc), args.slo_ttft_ms, args.slo_tpot_ms)


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    return {key: summary[key] for key in REPORTED}


# ---- 2. policies across loads ------------------------------------------------------------------

def load_traces(args: argparse.Namespace, trace: list[TraceRequest], capacity: float) -> dict[float, list[TraceRequest]]:
    """The trace of each load: below 100%, that fraction of the requests, so runs span alike."""
    loads = [float(x) for x in args.loads.split(",")]
    return {load: at_rate(trace[:max(1, round(len(trace) * min(1.0, load)))], load * capacity, args.seed)
            for load in loads}


def evaluate_policies(args: argparse.Namespace, traces: dict[float, list[TraceRequest]],
                      recorder: StepRecorder) -> dict[str, Any]:
    """Every policy at every load; the recorder keeps FCFS's steps (to fit the simulator's model)."""
    policies = args.policies.split(",")
    real: dict[str, dict[str, Any]] = {p: {} for p in policies}
    for policy in policies:
        engine = make_engine(args, policy)
        if policy == "fcfs":
            engine.cost_model = recorder  # FCFS predicts nothing: the engine only reports its steps
        for load, timed in traces.items():
            summary = run(engine, timed, args, f"{policy} @ {load:.0%}")
            real[policy][str(load)] = headline(summary)
            print(f"{policy:8s} load {load:4.0%}: " + format_row(real[policy][str(load)]), flush=True)
        del engine
    return {"loads": list(traces), "real": real}


def simulate_policies(args: argparse.Namespace, traces: dict[float, list[TraceRequest]], cost_model: Any) -> dict:
    """The same traces through the simulator: the real scheduler on a virtual clock."""
    return {policy: {str(load): headline(simulate_trace(args, timed, policy, cost_model))
                     for load, timed in traces.items()} for policy in args.policies.split(",")}


def simulate_trace(args: argparse.Namespace, trace: list[TraceRequest], policy: str, cost_model: Any) -> dict[str, Any]:
    config = SimConfig(policy=policy, max_num_batched_tokens=args.max_num_batched_tokens,
                       max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                       slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms)
    sim_trace = [SimRequest(len(r.prompt_token_ids), r.output_len, r.arrival_time_s, tuple(r.prompt_token_ids),
                            r.priority) for r in trace]
    result = simulate(sim_trace, config, cost_model)
    return summarize(result.records, result.duration_s, args.slo_ttft_ms, args.slo_tpot_ms)


def format_row(row: dict[str, Any]) -> str:
    return (f"TTFT mean {row['mean_ttft_ms']:8.0f} p99 {row['p99_ttft_ms']:8.0f} ms | "
            f"TPOT mean {row['mean_tpot_ms']:5.0f} p99 {row['p99_tpot_ms']:5.0f} ms | "
            f"JCT mean {row['mean_e2el_ms']:8.0f} p99 {row['p99_e2el_ms']:8.0f} ms | "
            f"SLO {row['slo_attainment']:.2f} goodput {row['request_goodput']:.3f} req/s | refused {row['failed']}")


# Two policies whose real figures are within this fraction of each other are a tie: run-to-run noise
# on this machine is about this large, so their order says nothing.
TIE_FRACTION = 0.10


def rank_agreement(real: dict[str, float], simulated: dict[str, float]) -> str:
    """Whether the simulator orders every pair of policies the real runs tell apart the same way."""
    separated = [(a, b) for a in real for b in real
                 if a < b and abs(real[a] - real[b]) > TIE_FRACTION * max(abs(real[a]), abs(real[b]))]
    wrong = [f"{a}/{b}" for a, b in separated if (real[a] < real[b]) != (simulated[a] < simulated[b])]
    verdict = "holds" if not wrong else f"DIFFERS on {', '.join(wrong)}"
    return (f"{verdict} ({len(separated)} pairs apart by > {TIE_FRACTION:.0%}); real "
            f"{ {p: round(v, 3) for p, v in real.items()} }, simulated { {p: round(v, 3) for p, v in simulated.items()} }")


# Budgets also measured in the chunking experiment, below the engine's own.
SMALLER_CHUNK_BUDGETS = (128, 256)


# ---- 3. chunked against unchunked prefill ------------------------------------------------------

def evaluate_chunking(args: argparse.Namespace, trace: list[TraceRequest], capacity: float) -> dict[str, Any]:
    """ShareGPT requests with every fourth replaced by a long document: does a long prompt stall
    the running decodes?  "chunked" is the engine's budget (--max-num-batched-tokens); smaller
    budgets show what Sarathi's rule (a chunk near the decode step's cost) would pick here."""
    tokenizer = make_engine.tokenizer
    documents = sample_long(tokenizer, len(trace) // 4 + 1, args.long_prompt_len, 64, seed=args.seed)
    mixed = [TraceRequest(tokenizer.encode(documents[i // 4].prompt), 64, 0.0) if i % 4 == 3 else r
             for i, r in enumerate(trace)]
    timed = at_rate(mixed[:round(len(mixed) * min(1.0, args.chunked_load))], args.chunked_load * capacity,
                    args.seed + 1)
    budgets = {"chunked": args.max_num_batched_tokens, "unchunked": args.max_model_len}
    budgets |= {f"chunked {b}": b for b in SMALLER_CHUNK_BUDGETS if b < args.max_num_batched_tokens}
    out: dict[str, Any] = {}
    for name, budget in budgets.items():
        engine = make_engine(args, "fcfs", max_num_batched_tokens=budget)
        records, duration_s = replay_cold(engine, timed, f"{name} prefill (budget {budget})")
        summary = summarize(records, duration_s, args.slo_ttft_ms, args.slo_tpot_ms)
        itl_ms = 1000 * np.array([gap for r in records if r.success for gap in r.itl_s])
        out[name] = {"max_num_batched_tokens": budget, "p99_itl_ms": summary["p99_itl_ms"],
                     "mean_itl_ms": summary["mean_itl_ms"], "p99.9_itl_ms": float(np.percentile(itl_ms, 99.9)),
                     "max_itl_ms": float(itl_ms.max()), **headline(summary)}
        print(f"{name:12s} budget {budget:5d}: ITL mean {out[name]['mean_itl_ms']:.0f} p99 {out[name]['p99_itl_ms']:.0f} "
              f"p99.9 {out[name]['p99.9_itl_ms']:.0f} max {out[name]['max_itl_ms']:.0f} ms", flush=True)
        del engine
    out["p99_itl_ratio"] = out["chunked"]["p99_itl_ms"] / out["unchunked"]["p99_itl_ms"]
    out["long_prompt_len"] = args.long_prompt_len
    return out


# ---- 4. prefix caching -------------------------------------------------------------------------

def evaluate_prefix_caching(args: argparse.Namespace, trace: list[TraceRequest], engine: LLMEngine) -> dict[str, Any]:
    """16 questions behind one shared system prompt, one every 2 s (no queueing): TTFT on and off."""
    system = engine.tokenizer.encode(" ".join(engine.tokenizer.decode(r.prompt_token_ids) for r in trace))
    system = system[:args.shared_prefix_len]
    questions = [r.prompt_token_ids[:64] for r in trace[:16]]
    prefixed = [TraceRequest(system + q, 16, 2.0 * i) for i, q in enumerate(questions)]
    out = {}
    for enabled in (False, True):
        cached = make_engine(args, "fcfs", enable_prefix_caching=enabled)
        records, _ = replay_trace(cached, prefixed, desc=f"prefix caching {'on' if enabled else 'off'}")
        ttfts = [r.ttft_s * 1000 for r in records[1:]]  # the first request fills the cache
        out["on" if enabled else "off"] = {"mean_ttft_ms": sum(ttfts) / len(ttfts),
                                           "first_ttft_ms": records[0].ttft_s * 1000,
                                           "hit_tokens": cached.kv.prefix_cache_hits_total}
        del cached
    out["ttft_ratio"] = out["on"]["mean_ttft_ms"] / out["off"]["mean_ttft_ms"]
    out["prefix_len"] = len(system)
    return out


# ---- output ------------------------------------------------------------------------------------

def markdown(report: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [f"# Scheduling policies: {args.num_prompts} ShareGPT requests, capacity "
             f"{report['capacity_req_s']:.3f} req/s, max_num_seqs {args.max_num_seqs}, SLO TTFT "
             f"{args.slo_ttft_ms:.0f} ms / TPOT {args.slo_tpot_ms:.0f} ms", ""]
    policies = report.get("policies")
    if policies:
        for load in policies["loads"]:
            lines += [f"## Load {load:.0%} ({load * report['capacity_req_s']:.3f} req/s)", "",
                      "| policy | mean TTFT ms | p99 TTFT ms | mean TPOT ms | p99 TPOT ms | mean JCT ms | p99 JCT ms "
                      "| SLO attainment | goodput req/s | refused | sim. mean JCT ms | sim. goodput |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for policy, rows in policies["real"].items():
                r = rows[str(load)]
                s = policies.get("simulated", {}).get(policy, {}).get(str(load)) or dict.fromkeys(r, math.nan)
                lines.append(f"| {policy} | {r['mean_ttft_ms']:.0f} | {r['p99_ttft_ms']:.0f} | {r['mean_tpot_ms']:.0f} "
                             f"| {r['p99_tpot_ms']:.0f} | {r['mean_e2el_ms']:.0f} | {r['p99_e2el_ms']:.0f} "
                             f"| {r['slo_attainment']:.2f} | {r['request_goodput']:.3f} | {r['failed']} "
                             f"| {s['mean_e2el_ms']:.0f} | {s['request_goodput']:.3f} |")
            lines.append("")
    chunking = report.get("chunking")
    if chunking:
        lines += [f"## Chunked prefill: every fourth request a {chunking['long_prompt_len']}-token document, "
                  f"{args.chunked_load:.0%} load", "",
                  "| run | token budget | mean ITL ms | p99 ITL ms | p99.9 ITL ms | max ITL ms | mean TTFT ms |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in chunking.items():
            if isinstance(r, dict):
                lines.append(f"| {name} | {r['max_num_batched_tokens']} | {r['mean_itl_ms']:.0f} | {r['p99_itl_ms']:.0f} "
                             f"| {r.get('p99.9_itl_ms', math.nan):.0f} | {r.get('max_itl_ms', math.nan):.0f} "
                             f"| {r['mean_ttft_ms']:.0f} |")
        lines.append("")
    for name, line in report.get("acceptance", {}).items():
        lines.append(f"- {name}: {line}")
    return "\n".join(lines) + "\n"


def acceptance(report: dict[str, Any]) -> dict[str, str]:
    checks = {}
    policies = report.get("policies")
    if policies:
        real, loads = policies["real"], [str(x) for x in policies["loads"]]
        if "1.0" in loads and {"mlfq", "fcfs"} <= set(real):
            ratio = real["mlfq"]["1.0"]["mean_e2el_ms"] / real["fcfs"]["1.0"]["mean_e2el_ms"]
            checks["MLFQ / FCFS mean JCT at 100% load"] = _verdict(ratio, MAX_MLFQ_OVER_FCFS_JCT, at_most=True)
        if "1.3" in loads and {"slo", "fcfs"} <= set(real):
            ratio = real["slo"]["1.3"]["request_goodput"] / max(real["fcfs"]["1.3"]["request_goodput"], 1e-9)
            checks["SLO / FCFS goodput at 130% load"] = _verdict(ratio, MIN_SLO_OVER_FCFS_GOODPUT, at_most=False)
        for load in loads if "simulated" in policies else ():
            for key in ("mean_e2el_ms", "request_goodput"):
                checks[f"simulator orders {key} at {float(load):.0%} as the real runs do"] = rank_agreement(
                    {p: real[p][load][key] for p in real}, {p: policies["simulated"][p][load][key] for p in real})
    if "chunking" in report:
        checks["chunked / unchunked p99 ITL"] = _verdict(report["chunking"]["p99_itl_ratio"],
                                                         MAX_CHUNKED_OVER_UNCHUNKED_P99_ITL, at_most=True)
    if "prefix_caching" in report:
        checks["prefix hit / miss TTFT"] = _verdict(report["prefix_caching"]["ttft_ratio"], MAX_HIT_OVER_MISS_TTFT,
                                                    at_most=True)
    return checks


def _verdict(ratio: float, goal: float, at_most: bool) -> str:
    holds = ratio <= goal if at_most else ratio >= goal
    return f"{ratio:.2f}x (goal {'<=' if at_most else '>='} {goal}x): {'holds' if holds else 'DOES NOT HOLD'}"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = report["policies"]
    loads = policies["loads"]
    panels = (("mean_e2el_ms", "mean JCT (ms)"), ("p99_ttft_ms", "p99 TTFT (ms)"),
              ("p99_tpot_ms", "p99 TPOT (ms)"), ("request_goodput", "goodput (req/s)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for axis, (key, label) in zip(axes, panels):
        for policy, rows in policies["real"].items():
            axis.plot([100 * x for x in loads], [rows[str(x)][key] for x in loads], marker="o", label=policy)
            axis.plot([100 * x for x in loads], [policies["simulated"][policy][str(x)][key] for x in loads],
                      linestyle=":", color=axis.lines[-1].get_color())
        axis.set_xlabel("load (% of capacity)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].legend(title="real (dotted: simulated)")
    fig.suptitle(f"Scheduling policies on SmolLM2-135M, ShareGPT, Poisson arrivals "
                 f"(capacity {report['capacity_req_s']:.2f} req/s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    args = parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    parts = set(args.only.split(",")) if args.only else (
        {"prefix", "policies", "chunked", "simulate"} - {p for p in ("prefix", "policies", "chunked")
                                                          if getattr(args, f"skip_{p}")})
    report: dict[str, Any] = json.loads(args.out.with_suffix(".json").read_text()) if args.only else {}
    report["args"] = {k: str(v) for k, v in vars(args).items()}
    profiler = make_engine(args, "slo")  # profiles a step cost model at start-up
    recorder = StepRecorder()
    make_engine.tokenizer = profiler.tokenizer
    trace = base_trace(profiler, args)
    if "capacity_req_s" not in report:
        fcfs = make_engine(args, "fcfs")
        fcfs.cost_model = recorder  # its steps fit the simulator's cost model
        capacity_run = run(fcfs, trace, args, "capacity (fcfs, all at once)")
        report["capacity_req_s"] = capacity_run["request_throughput"]
        print(f"capacity: {report['capacity_req_s']:.3f} req/s, {capacity_run['output_throughput']:.0f} output tok/s")
        del fcfs
    capacity = report["capacity_req_s"]
    traces = load_traces(args, trace, capacity)
    if "prefix" in parts:
        report["prefix_caching"] = evaluate_prefix_caching(args, trace, profiler)
        print("prefix caching:", json.dumps(report["prefix_caching"]), flush=True)
    if "policies" in parts:
        report["policies"] = evaluate_policies(args, traces, recorder)
    if "chunked" in parts:
        report["chunking"] = evaluate_chunking(args, trace, capacity)
        print("chunking:", json.dumps(report["chunking"]), flush=True)
    if "simulate" in parts and "policies" in report:
        # Fitted on the real FCFS steps this run measured, the capacity run's and every load's: the
        # batches the simulated policies will form.  (The start-up profile misses decode attention
        # on long contexts, which online refinement cannot add back; the chunking experiment's
        # whole-prompt steps are another regime, and fitting them too cost the policies' decode
        # steps ~25% of their predicted time.)
        cost_model = StepCostModel.fit(recorder.samples, description="fitted on this run's real FCFS steps") \
            if len(recorder.samples) >= 100 else profiler.cost_model
        report["cost_model"] = {**cost_model.to_dict(), "num_samples": len(recorder.samples)}
        report["policies"]["simulated"] = simulate_policies(args, traces, cost_model)
    report["acceptance"] = acceptance(report)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(markdown(report, args))
    if "simulated" in report.get("policies", {}):
        plot(report, args.out.with_suffix(".png"))
    print(markdown(report, args))


if __name__ == "__main__":
    main()
