"""The scheduler turning the elastic knobs (issue #15): SLO attainment and quality under load, on
the real model, for a mix of three request classes, against fixed settings.

Request classes (ShareGPT text; targets set from this machine's measured step times, printed):

    chat      a ShareGPT question, up to --chat-output tokens, tight TPOT, TTFT a few seconds;
              floor: level >= 70 (perplexity at most ~2.3x the full model's)
    document  a ~--doc-len-token stretch of ShareGPT text and a question, 16 output tokens,
              a TTFT target, no TPOT; floor: prompt_keep >= 0.3 (needle recall at 4k tokens equal
              to the whole prompt's, prompt_pruning.md)
    batch     a ShareGPT question, --batch-output tokens, loose targets, no floor

Variants, each the same trace at each load (Poisson arrivals at --loads x capacity).  Capacity is
the full model's SLO capacity (--capacity slo, the default; DistServe's goodput): the highest
Poisson rate at which the slo policy at the full model meets 90% of the targets, found by a short
search down from the throughput capacity (this mix's requests/s under FCFS, every request at
once; --capacity throughput, the definition before 2026-12-04).  So 1.0x is where the full model
just keeps up with the targets, and 1.5x is load it cannot serve within them:

    fcfs          FCFS, full model, whole prompts
    slo@L         the slo policy, every request at fixed level L (L = 100 is "slo at the full model")
    slo auto      the slo policy choosing level and prompt_keep per request and step, within the floors
    slo floor     the slo policy, every request at the cheapest setting its class's floor allows (chat
                  level 70, documents and batch requests level 40; every prompt on 30% of it): the most
                  load any choice within the floors can serve, at the lowest quality

Reported per load and variant: SLO attainment (the request's own targets), goodput (req/s that met
them), quality-weighted goodput (req/s that met them at a setting meeting the request's floor:
level and keep at or above them), mean level (over generated tokens) and prompt_keep (document
requests), the share of requests served wholly at level 100 on their whole prompt, and each run's
mean quality (engine/elastic/quality_table.py) for the Pareto plot.  A load step (--step-base x
capacity, x2 for --step-seconds, then back) shows auto's level over time.  The simulator (engine
bench simulate, with the profiled knob costs and the measured mixed-step ratio) replays the same
traces: does it rank the variants as the real runs do?  Reported as the full order and, since a
run's counts are noisy, as the pairs of variants the measured run tells apart (by more than the
standard error of the difference) that the simulator orders the other way.

    .venv/bin/python benchmarks/slo_elastic.py                  # about 30 minutes here
    .venv/bin/python benchmarks/slo_elastic.py --num-requests 16 --loads 1.5 --levels 100,40 --skip-step
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from engine import LLM
from engine.bench.arrivals import arrival_times
from engine.bench.datasets import sample_long, sample_sharegpt
from engine.bench.metrics import RequestRecord, meets_slos
from engine.bench.replay import TraceRequest, replay_trace
from engine.bench.simulate import SimConfig, SimRequest, simulate
from engine.config import SLOConfig
from engine.elastic.quality_table import QualityTable
from engine.request import SLOTarget
from engine.scheduler.elastic_choice import AUTO, KEEP_LADDER
from engine.scheduler.slo_policy import LOAD_WINDOW_S

RESULTS = Path(__file__).parent / "results"
SLO_CAPACITY_ATTAINMENT = 0.9  # the full model's SLO capacity: the rate at which it meets this share
STEP_DOWN = 0.7  # the SLO capacity search's step down from the throughput capacity
CLASSES = ("chat", "document", "batch")
FLOOR = "floor"  # the "slo floor" variant's level: each request at the cheapest setting its class's floor allows


@dataclass(frozen=True)
class ClassSpec:
    name: str
    slo: SLOTarget
    min_level: int | None = None
    min_prompt_keep: float | None = None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=36, help="per run (a third of each class)")
    parser.add_argument("--loads", default="0.5,1.0,1.5,2.0")
    parser.add_argument("--levels", default="100,70,40", help="fixed levels run under the slo policy")
    parser.add_argument("--chat-output", type=int, default=48)
    parser.add_argument("--batch-output", type=int, default=96)
    parser.add_argument("--doc-len", type=int, default=1536)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--step-seconds", type=float, default=30.0)
    # The load step's rate before and after the doubling, in capacities.  Below 1: at the full
    # model's capacity itself the backlog of the doubled rate never drains without a lower level
    # (measured: at 1.0x, before any step, auto was at level 100 on 44-98% of the steps).
    parser.add_argument("--step-base", type=float, default=0.75)
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--capacity", choices=("slo", "throughput"), default="slo",
                        help="what the loads are multiples of: the full model's SLO capacity (the highest rate at "
                             "which slo@100 meets 90%% of the targets) or its throughput (FCFS, all at once)")
    parser.add_argument("--out", default=str(RESULTS / "slo_elastic"))
    parser.add_argument("--variants", default=None,
                        help="run only these variants (comma-separated labels, e.g. 'slo auto'), keeping the capacity, "
                             "the targets and the other variants' results of the --out JSON if there is one")
    args = parser.parse_args()
    if Path(args.out).suffix:  # out.json, .md and .png are made with with_suffix: "run_1.5x" would lose ".5x"
        parser.error(f"--out is a file stem without an extension, got {args.out}")
    return args


def class_specs(llm: LLM, args: argparse.Namespace) -> dict[str, ClassSpec]:
    """Targets from this machine's measured times (not the start-up cost model's predictions,
    which move run to run): the full model's decode step at max_num_seqs rows (the median time
    between tokens of that many requests decoding together) and a document's whole prefill alone
    (the median first-token time of a few, one at a time)."""
    tokenizer = llm.get_tokenizer()
    rows = sample_sharegpt(tokenizer, args.max_num_seqs, seed=args.seed + 7, max_prompt_len=64, fixed_output_len=32)
    decode_trace = [TraceRequest(s.prompt_token_ids or tokenizer.encode(s.prompt), 32, 0.0, elastic={"elastic_level": 100})
                    for s in rows]
    replay_trace(llm.engine, decode_trace, desc="targets: warm-up", show_progress=False)  # first calls pay set-up
    records, _ = replay_trace(llm.engine, decode_trace, desc="targets: decode step", show_progress=False)
    decode_s = float(np.median([itl for r in records for itl in r.itl_s[len(r.itl_s) // 2:]]))  # all decoding
    prefills = []
    for doc in sample_long(tokenizer, 3, args.doc_len, 1, seed=args.seed + 7):
        records, _ = replay_trace(llm.engine, [TraceRequest(doc.prompt_token_ids or tokenizer.encode(doc.prompt), 1, 0.0,
                                                            elastic={"elastic_level": 100})],
                                  desc="targets: prefill", show_progress=False)
        prefills.append(records[0].ttft_s)
    doc_prefill_s = float(np.median(prefills))
    print(f"measured: full-model decode step at {args.max_num_seqs} rows {1000 * decode_s:.1f} ms; "
          f"{args.doc_len}-token prefill alone {1000 * doc_prefill_s:.0f} ms")
    return {"chat": ClassSpec("chat", SLOTarget(ttft_s=3.0, tpot_s=1.5 * decode_s), min_level=70),
            "document": ClassSpec("document", SLOTarget(ttft_s=3.0 * doc_prefill_s), min_prompt_keep=0.3),
            "batch": ClassSpec("batch", SLOTarget(ttft_s=60.0, tpot_s=1.0))}


def with_targets(specs: dict[str, ClassSpec], targets: dict[str, list[float | None]]) -> dict[str, ClassSpec]:
    """The classes with the (ttft_s, tpot_s) targets an earlier run measured and wrote."""
    return {name: replace(spec, slo=SLOTarget(ttft_s=targets[name][0], tpot_s=targets[name][1]))
            for name, spec in specs.items()}


def base_trace(llm: LLM, args: argparse.Namespace, specs: dict[str, ClassSpec]) -> list[tuple[str, TraceRequest]]:
    """The requests, in a seeded mixed order, arrival times still 0."""
    tokenizer = llm.get_tokenizer()
    per_class = args.num_requests // 3
    chats = sample_sharegpt(tokenizer, per_class, seed=args.seed, max_prompt_len=256, fixed_output_len=args.chat_output)
    batches = sample_sharegpt(tokenizer, per_class, seed=args.seed + 1, max_prompt_len=256,
                              fixed_output_len=args.batch_output)
    docs = sample_long(tokenizer, per_class, args.doc_len, 16, seed=args.seed)
    rows = [(name, sample) for name, samples in (("chat", chats), ("document", docs), ("batch", batches))
            for sample in samples]
    random.Random(args.seed).shuffle(rows)
    return [(name, TraceRequest(s.prompt_token_ids or tokenizer.encode(s.prompt), s.expected_output_len, 0.0,
                                slo=specs[name].slo))
            for name, s in rows]


def with_variant(trace: list[tuple[str, TraceRequest]], specs: dict[str, ClassSpec], level: int | str,
                 times: list[float], lowest_level: int | None = None) -> list[TraceRequest]:
    """The trace at these arrival times, every request at `level` (a level, AUTO or FLOOR; FLOOR
    needs the model's lowest_level)."""
    out = []
    for (name, request), t in zip(trace, times):
        spec = specs[name]
        elastic: dict[str, Any] = {"elastic_level": level}
        if level == AUTO:
            elastic.update(prompt_keep=AUTO, min_level=spec.min_level, min_prompt_keep=spec.min_prompt_keep)
        elif level == FLOOR:  # the cheapest setting the floors allow: the most any choice within them can serve
            elastic = {"elastic_level": spec.min_level or lowest_level,
                       "prompt_keep": spec.min_prompt_keep or KEEP_LADDER[-1]}
        out.append(replace(request, arrival_time_s=t, elastic=elastic))
    return out


def meets_floor(spec: ClassSpec, record: RequestRecord) -> bool:
    level_ok = spec.min_level is None or all(level >= spec.min_level for level in record.token_levels)
    keep_ok = spec.min_prompt_keep is None or (record.prompt_keep or 1.0) >= spec.min_prompt_keep
    return level_ok and keep_ok


def summarize_run(names: list[str], records: list[RequestRecord], duration_s: float,
                  specs: dict[str, ClassSpec], quality: QualityTable) -> dict[str, Any]:
    """`quality`: the table the engine's SLO policy ranks settings by (its checkpoint's)."""
    met = [meets_slos(r, 1000 * specs[n].slo.ttft_s, None if specs[n].slo.tpot_s is None else 1000 * specs[n].slo.tpot_s)
           for n, r in zip(names, records)]
    quality_met = [m and meets_floor(specs[n], r) for m, n, r in zip(met, names, records)]
    levels = [level for r in records for level in r.token_levels]
    keeps = [r.prompt_keep or 1.0 for n, r in zip(names, records) if n == "document" and r.success]
    qualities = [quality.quality(int(np.mean(r.token_levels)) if r.token_levels else 100, r.prompt_keep or 1.0)
                 for r in records if r.success]
    at_full = [all(level == 100 for level in r.token_levels) and (r.prompt_keep or 1.0) >= 1.0 for r in records]
    return {"slo_attainment": float(np.mean(met)), "goodput": sum(met) / duration_s,
            "full_share": float(np.mean(at_full)),
            "full_share_by_class": {c: float(np.mean([f for f, n in zip(at_full, names) if n == c])) for c in CLASSES},
            "quality_goodput": sum(quality_met) / duration_s, "mean_level": float(np.mean(levels)) if levels else None,
            "mean_doc_keep": float(np.mean(keeps)) if keeps else None,
            "mean_quality": float(np.mean(qualities)) if qualities else None,
            "failed": sum(not r.success for r in records), "duration_s": duration_s,
            "by_class": {c: float(np.mean([m for m, n in zip(met, names) if n == c])) for c in CLASSES},
            "misses": {c: misses(specs[c], [r for n, r in zip(names, records) if n == c]) for c in CLASSES}}


def misses(spec: ClassSpec, records: list[RequestRecord]) -> dict[str, Any]:
    """Why a class's requests missed: how many missed the TTFT target, how many the TPOT target
    (one request may miss both), and the class's median and worst mean TPOT (ms)."""
    served = [r for r in records if r.success]
    ttft_missed = sum(r.ttft_s is None or r.ttft_s > spec.slo.ttft_s for r in served)
    tpots = [1000 * r.tpot_s for r in served if r.tpot_s is not None]
    tpot_missed = 0 if spec.slo.tpot_s is None else sum(t > 1000 * spec.slo.tpot_s for t in tpots)
    return {"ttft": ttft_missed, "tpot": tpot_missed, "failed": len(records) - len(served),
            "tpot_ms_median": float(np.median(tpots)) if tpots else None,
            "tpot_ms_max": float(np.max(tpots)) if tpots else None}


def measure_capacity(llm: LLM, trace: list[tuple[str, TraceRequest]], specs) -> float:
    """Throughput capacity: this mix's requests/s under FCFS, every request arriving at once."""
    records, duration = replay_trace(llm.engine, with_variant(trace, specs, 100, [0.0] * len(trace)),
                                     desc="capacity (fcfs, all at once)")
    return sum(r.success for r in records) / duration


def measure_slo_capacity(llm: LLM, trace, specs, throughput: float, args) -> tuple[float, list[list[float]]]:
    """SLO capacity (DistServe's goodput definition): the highest Poisson rate at which the slo
    policy at the full model meets SLO_CAPACITY_ATTAINMENT of the requests' targets.  Steps down
    from the throughput capacity by STEP_DOWN until met, then bisects (geometric) twice.  Returns
    the rate and every probe (rate, attainment)."""
    names = [name for name, _ in trace]
    probes: list[list[float]] = []

    def attainment(rate: float) -> float:
        times = arrival_times(len(trace), rate, seed=args.seed)
        records, duration = replay_trace(llm.engine, with_variant(trace, specs, 100, times),
                                         desc=f"slo capacity probe {rate:.3f} req/s")
        met = summarize_run(names, records, duration, specs, llm.engine.scheduler.policy.choice.quality)["slo_attainment"]
        probes.append([rate, met])
        print(f"slo@100 at {rate:.3f} req/s: attainment {met:.2f}", flush=True)
        return met

    low, high = None, throughput
    rate = throughput * STEP_DOWN
    while low is None and rate > throughput / 64:
        if attainment(rate) >= SLO_CAPACITY_ATTAINMENT:
            low = rate
        else:
            high, rate = rate, rate * STEP_DOWN
    if low is None:
        raise SystemExit("the full model meets the targets at no rate tried: relax the targets")
    for _ in range(2):
        middle = (low * high) ** 0.5
        if attainment(middle) >= SLO_CAPACITY_ATTAINMENT:
            low = middle
        else:
            high = middle
    return low, probes


def run_variants(llms: dict[str, LLM], trace, specs, capacity: float, args) -> dict[str, dict[str, Any]]:
    levels = [int(v) for v in args.levels.split(",")]
    results: dict[str, dict[str, Any]] = {}
    names = [name for name, _ in trace]
    quality = llms["slo"].engine.scheduler.policy.choice.quality
    lowest_level = llms["slo"].engine.scheduler.policy.choice.levels[-1]  # the narrowest (slo floor)
    for load in [float(v) for v in args.loads.split(",")]:
        times = arrival_times(len(trace), load * capacity, seed=args.seed)
        variants = [("fcfs", "fcfs", 100), *((f"slo@{lv}", "slo", lv) for lv in levels), ("slo auto", "slo", AUTO),
                    ("slo floor", "slo", FLOOR)]
        if args.variants:
            variants = [v for v in variants if v[0] in args.variants.split(",")]
        for label, policy, level in variants:
            llm = llms[policy]
            if level == AUTO:
                start_fresh(llm.engine)
            requests = with_variant(trace, specs, level, times, lowest_level)
            records, duration = replay_trace(llm.engine, requests, desc=f"{load:.1f}x {label}")
            results[f"{load}|{label}"] = summarize_run(names, records, duration, specs, quality)
            sim_records, sim_duration = simulated(llms["slo"], llm, requests, policy, args)
            results[f"{load}|{label}"]["sim"] = summarize_run(names, sim_records, sim_duration, specs, quality)
            print(f"{load:.1f}x {label}: {results[f'{load}|{label}']}", flush=True)
    return results


def start_fresh(engine) -> None:
    """An auto run starts from the full model and inherits no load: the engine idles the slo
    policy's load window first (load_pressure counts the steps run over its last LOAD_WINDOW_S,
    which would otherwise be the run before's)."""
    time.sleep(LOAD_WINDOW_S)
    choice = engine.scheduler.policy.choice
    choice.level = choice.decode_level = choice.levels[0]


def simulated(slo_llm: LLM, llm: LLM, variant: list[TraceRequest], policy: str, args) -> tuple[list, float]:
    """The same run in the simulator: the slo engine's fitted step cost model and knob costs, and
    its best-effort service of requests it cannot serve on target (refused, they left the
    simulated queue: at 2.0x load slo@100 ended in 40 simulated seconds against 68 measured)."""
    engine = slo_llm.engine
    config = SimConfig(policy=policy, max_num_batched_tokens=engine.scheduler.max_num_batched_tokens,
                       slo_best_effort=engine.scheduler.policy.config.best_effort,  # (fcfs reads no SLO config)
                       max_num_seqs=args.max_num_seqs, num_kv_blocks=llm.engine.kv.pool.num_blocks,
                       max_model_len=engine.max_model_len, enable_prefix_caching=False,
                       knob_costs=engine.knob_costs, quality=engine.scheduler.policy.choice.quality,
                       min_pruned_prompt_tokens=engine.config.prompt_pruning.min_prompt_tokens)
    requests = [SimRequest(len(r.prompt_token_ids), r.output_len, r.arrival_time_s, slo=r.slo, **r.elastic)
                for r in variant]
    if policy == "fcfs":
        requests = [replace(r, slo=None) for r in requests]  # fcfs ignores targets; records still judged by them
    result = simulate(requests, config, engine.cost_model)
    return result.records, result.duration_s


def load_step(llm: LLM, trace, specs, capacity: float, args) -> dict[str, list[float]]:
    """Auto at step_base x capacity, doubled for step_seconds, then back: auto's level over time."""
    engine = llm.engine
    rng = np.random.default_rng(args.seed)
    times, t = [], 0.0
    phases = ((args.step_seconds, args.step_base), (args.step_seconds, 2 * args.step_base),
              (args.step_seconds, args.step_base))
    start = 0.0
    for length, factor in phases:
        while t < start + length:
            t += rng.exponential(1.0 / (factor * capacity))
            if t < start + length:
                times.append(t)
        start += length
    requests = [trace[i % len(trace)] for i in range(len(times))]
    start_fresh(engine)
    levels_over_time: list[tuple[float, int, int]] = []  # (seconds, the prompts' level, the decodes')
    policy = engine.scheduler.policy
    original = policy.prepare_step
    clock_start = [None]

    def record(running, waiting, now):
        original(running, waiting, now)
        clock_start[0] = clock_start[0] or now
        levels_over_time.append((now - clock_start[0], policy.choice.level, policy.choice.decode_level))

    policy.prepare_step = record
    try:
        replay_trace(engine, with_variant(requests, specs, AUTO, times), desc="load step (auto)")
    finally:
        policy.prepare_step = original
    return {"t": [t for t, _, _ in levels_over_time], "level": [lv for _, lv, _ in levels_over_time],
            "decode_level": [lv for _, _, lv in levels_over_time],
            "phases": [list(p) for p in phases]}


def write(results: dict, step: dict | None, capacity: float, specs, args, throughput: float,
          probes: list[list[float]]) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"capacity": capacity, "capacity_kind": args.capacity,
                                                    "throughput_capacity": throughput,
                                                    "slo_capacity_probes": probes, "results": results, "step": step,
                                                    "targets": {n: [s.slo.ttft_s, s.slo.tpot_s] for n, s in specs.items()}},
                                                   indent=1))
    kind = "SLO capacity (slo@100 meets 90%)" if args.capacity == "slo" else "throughput capacity"
    lines = [f"# SLO-driven elastic settings: {args.num_requests} requests a run, loads x {kind} {capacity:.3f} req/s", "",
             f"Throughput capacity (FCFS, all at once): {throughput:.3f} req/s; SLO capacity probes (req/s, slo@100 "
             "attainment): " + ", ".join(f"{r:.3f} {a:.2f}" for r, a in probes), "",
             "Targets (s): " + ", ".join(f"{n} TTFT {s.slo.ttft_s:.2f} / TPOT {s.slo.tpot_s}" for n, s in specs.items()), ""]
    for load in sorted({key.split("|")[0] for key in results}, key=float):
        lines += [f"## Load {float(load):.1f}x", "",
                  "| variant | SLO attainment | goodput req/s | quality-weighted goodput | mean level | doc keep | at level 100, whole prompt | mean quality | chat / doc / batch attainment | chat misses TTFT / TPOT, median TPOT ms |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for key, r in results.items():
            if key.split("|")[0] != load:
                continue
            by_class = " / ".join(f"{r['by_class'][c]:.2f}" for c in CLASSES)
            lines.append(f"| {key.split('|')[1]} | {r['slo_attainment']:.2f} | {r['goodput']:.3f} | {r['quality_goodput']:.3f} | "
                         f"{r['mean_level'] or 0:.0f} | {r['mean_doc_keep'] or 1:.2f} | {_share(r.get('full_share'))} | "
                         f"{r['mean_quality'] or 0:.3f} | {by_class} | {_chat_misses(r)} |")
        lines.append("")
    lines += ranking_lines(results, args.num_requests)
    if step:
        lines += step_lines(step_summary(step))
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    plot(results, step, out.with_suffix(".png"))


def step_summary(step: dict) -> dict[str, Any]:
    """The load step in figures: per phase, its steps and the share of them with the prompts' and
    the decodes' level at 100; the steps and seconds from the doubling to the prompts' level's
    first fall (None where it did not fall, or was below 100 already); the seconds from the rate
    falling back to its last step below 100 (None where it was still below at the end)."""
    t, level = np.array(step["t"]), np.array(step["level"])
    decode = np.array(step.get("decode_level", step["level"]))  # one level for both before 2026-12-07
    edges = np.cumsum([0.0] + [length for length, _ in step["phases"]])
    phases = []
    for (length, factor), start, end in zip(step["phases"], edges[:-1], edges[1:]):
        inside = (t >= start) & (t < end) if end < edges[-1] else t >= start  # the last runs to the end
        phases.append({"factor": factor, "start_s": float(start), "steps": int(inside.sum()),
                       "prompts_at_100": float(np.mean(level[inside] == 100)) if inside.any() else None,
                       "decodes_at_100": float(np.mean(decode[inside] == 100)) if inside.any() else None})
    doubled, back = edges[1], edges[2]
    first = int(np.searchsorted(t, doubled))
    below_at_doubling = bool(first < len(t) and level[first] < 100)
    # Already below 100 when the rate doubled: no fall to time.
    fell = np.flatnonzero((t >= doubled) & (level < 100))[:0 if below_at_doubling else None]
    below_after = t[(t >= back) & (level < 100)]
    return {"phases": phases,
            "below_at_doubling": below_at_doubling,
            "steps_to_fall": int(fell[0] - first) if len(fell) else None,
            "seconds_to_fall": float(t[fell[0]] - doubled) if len(fell) else None,
            "seconds_to_recover": (None if len(below_after) and level[-1] < 100
                                   else float(below_after.max() - back) if len(below_after) else 0.0)}


def step_lines(summary: dict[str, Any]) -> list[str]:
    phases = summary["phases"]
    lines = [f"## Load step: {phases[0]['factor']:g}x capacity, {phases[1]['factor']:g}x from "
             f"{phases[1]['start_s']:.0f} s to {phases[2]['start_s']:.0f} s, then {phases[2]['factor']:g}x", "",
             "| phase | from (s) | steps | prompts' level at 100 | decodes' level at 100 |", "|---|---|---|---|---|"]
    for phase in phases:
        lines.append(f"| {phase['factor']:g}x | {phase['start_s']:.0f} | {phase['steps']} | "
                     f"{_share(phase['prompts_at_100'])} | {_share(phase['decodes_at_100'])} |")
    fall = ("was already below 100 when the rate doubled" if summary.get("below_at_doubling") else
            "did not fall" if summary["steps_to_fall"] is None else
            f"first fell {summary['steps_to_fall']} steps ({summary['seconds_to_fall']:.2f} s) after the rate doubled")
    recover = ("was still below 100 at the end" if summary["seconds_to_recover"] is None else
               f"was last below 100 {summary['seconds_to_recover']:.1f} s after the rate fell back")
    return lines + ["", f"The prompts' level {fall}; it {recover}.", ""]


def _chat_misses(result: dict) -> str:
    chat = result.get("misses", {}).get("chat")  # (results written before misses were counted: none)
    if chat is None:
        return "-"
    return f"{chat['ttft']} / {chat['tpot']}, {chat['tpot_ms_median'] or 0:.1f}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def ranking_lines(results: dict, num_requests: int) -> list[str]:
    """Per load, the variants ranked by quality-weighted goodput, measured and simulated; and of
    the pairs of variants the measured run tells apart (separated_pairs), those the simulator
    orders the other way."""
    lines = ["## Simulator against the real runs (ranked by quality-weighted goodput)", "",
             "Pairs told apart: the measured difference exceeds its standard error (each run's count of "
             f"requests served on target at quality taken as binomial over its {num_requests} requests).", "",
             "| load | measured order | simulated order | same order | pairs told apart "
             "| of those, ordered the other way |",
             "|---|---|---|---|---|---|"]
    for load in sorted({key.split("|")[0] for key in results}, key=float):
        keys = [k for k in results if k.split("|")[0] == load]
        real = sorted(keys, key=lambda k: -results[k]["quality_goodput"])
        sim = sorted(keys, key=lambda k: -results[k]["sim"]["quality_goodput"])
        names = lambda order: " > ".join(k.split("|")[1] for k in order)  # noqa: E731
        separated = separated_pairs([results[k] for k in real], num_requests)
        discordant = [(a, b) for a, b in separated
                      if results[real[a]]["sim"]["quality_goodput"] < results[real[b]]["sim"]["quality_goodput"]]
        other_way = ", ".join(f"{real[a].split('|')[1]} / {real[b].split('|')[1]}" for a, b in discordant)
        lines.append(f"| {float(load):.1f}x | {names(real)} | {names(sim)} | {real == sim} | {len(separated)} | "
                     f"{other_way or 'none'} |")
    return lines + [""]


def separated_pairs(ranked: list[dict], num_requests: int) -> list[tuple[int, int]]:
    """(better, worse) index pairs of runs, best first, whose quality-weighted goodput differs by
    more than the standard error of the difference: each run's count k of requests that met their
    targets at quality is binomial over num_requests (variance n p (1 - p)), over its duration.
    p is estimated as (k + 1) / (n + 2) (Laplace): at k = n the plain k / n gives no variance, and
    two runs that met every target told apart by their durations' last digits (0.5x, run L)."""
    def variance(r: dict) -> float:
        met = min(num_requests, round(r["quality_goodput"] * r["duration_s"]))
        p = (met + 1) / (num_requests + 2)
        return num_requests * p * (1 - p) / r["duration_s"] ** 2

    return [(a, b) for a in range(len(ranked)) for b in range(a + 1, len(ranked))
            if ranked[a]["quality_goodput"] - ranked[b]["quality_goodput"]
            > (variance(ranked[a]) + variance(ranked[b])) ** 0.5]


def plot(results: dict, step: dict | None, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if step else 2, figsize=(16 if step else 11, 4.5))
    variants = sorted({key.split("|")[1] for key in results})
    loads = sorted({float(key.split("|")[0]) for key in results})
    for variant in variants:
        ys = [results.get(f"{load}|{variant}", {}).get("quality_goodput") for load in loads]
        axes[0].plot(loads, ys, marker="o", label=variant)
        points = [(results[k]["slo_attainment"], results[k]["mean_quality"]) for k in results if k.endswith(f"|{variant}")]
        axes[1].scatter(*zip(*points), label=variant)
    axes[0].set(xlabel="load (x capacity)", ylabel="quality-weighted goodput (req/s)", title="goodput at quality")
    axes[1].set(xlabel="SLO attainment", ylabel="mean quality (1 = full model, whole prompt)",
                title="quality against attainment (every load)")
    axes[0].legend(), axes[1].legend()
    if step:
        axes[2].plot(step["t"], step["level"], drawstyle="steps-post", label="prompts")
        if "decode_level" in step:  # runs before 2026-12-07 (afternoon) had one level for both
            axes[2].plot(step["t"], step["decode_level"], drawstyle="steps-post", label="decodes", alpha=0.7)
            axes[2].legend(loc="lower left")
        edge = 0.0
        for length, factor in step["phases"][:-1]:
            edge += length
            axes[2].axvline(edge, color="grey", linestyle="--")
        base, doubled = step["phases"][0][1], step["phases"][1][1]
        axes[2].set(xlabel="seconds", ylabel="auto requests' level",
                    title=f"load step: {base:g}x capacity, {doubled:g}x between the lines")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    args = parse_args()
    slo = SLOConfig(best_effort=True)  # refusals would hide what each variant does with the load
    llms = {"slo": LLM(scheduling_policy="slo", max_num_seqs=args.max_num_seqs, slo=slo, enable_prefix_caching=False)}
    saved = Path(args.out).with_suffix(".json")
    # With --variants, an earlier run's capacity, targets and other results are kept where there is
    # one; a fresh --out measures them and runs only those variants.
    earlier = json.loads(saved.read_text()) if args.variants and saved.exists() else None
    specs = class_specs(llms["slo"], args)
    if earlier and "targets" in earlier:  # the kept variants were judged by these: so are the new ones
        specs = with_targets(specs, earlier["targets"])
        print("targets of the earlier run:", {n: s.slo for n, s in specs.items()})
    trace = base_trace(llms["slo"], args, specs)
    llms["fcfs"] = LLM(max_num_seqs=args.max_num_seqs, enable_prefix_caching=False)
    throughput = earlier.get("throughput_capacity", earlier["capacity"]) if earlier else measure_capacity(llms["fcfs"], trace, specs)
    probes = earlier.get("slo_capacity_probes", []) if earlier else []
    capacity = throughput
    if earlier:
        capacity = earlier["capacity"]
    elif args.capacity == "slo":
        capacity, probes = measure_slo_capacity(llms["slo"], trace, specs, throughput, args)
    print(f"throughput capacity {throughput:.3f} req/s; loads are multiples of {capacity:.3f} req/s", flush=True)
    results = {**(earlier["results"] if earlier else {}), **run_variants(llms, trace, specs, capacity, args)}
    step = (earlier or {}).get("step") if args.skip_step else load_step(llms["slo"], trace, specs, capacity, args)
    write(results, step, capacity, specs, args, throughput, probes)


if __name__ == "__main__":
    main()
