"""Capacity planning by simulation: how many replicas of which tensor-parallel size serve a trace
within its SLOs on the fewest accelerators (`engine bench simulate --plan-gpus N`).

Every candidate (a cost profile at its TP size, times a replica count that fits the budget) serves
the same trace in the simulator (engine/bench/simulate.py: the real scheduler on a virtual clock);
the plan is the one with the fewest accelerators whose SLO attainment reaches the target, ties
broken by goodput.  A profile is a step cost model for one model on one machine at one TP size:
fitted from real steps where the machine is at hand, otherwise a roofline estimate, stated as
such.  The built-in H100 profiles below are estimates (this project's machines have no GPU).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from tqdm import tqdm

from engine.bench.simulate import (
    COST_PROFILES,
    CostProfile,
    SimConfig,
    SimRequest,
    load_trace,
    sim_config_from_args,
    simulate,
)
from engine.scheduler.cost_model import CostCoefficients

# Llama-3-70B: 80 layers, hidden 8192, 64 query / 8 KV heads of 128, 70.6e9 parameters, bf16.
LLAMA3_70B_PARAMETERS = 70.6e9
LLAMA3_70B_LAYERS, LLAMA3_70B_HIDDEN, LLAMA3_70B_KV_HEADS, LLAMA3_70B_HEAD_DIM = 80, 8192, 8, 128
# H100 SXM 80 GB: HBM3 3.35 TB/s, 989 TFLOP/s dense bf16, NVLink 4 (450 GB/s a direction).
H100_BYTES_PER_S, H100_FLOPS, H100_MEMORY, NVLINK_BYTES_PER_S = 3.35e12, 989e12, 80e9, 450e9
ACHIEVED_BANDWIDTH, ACHIEVED_FLOPS = 0.8, 0.5  # fractions of peak a tuned engine reaches
ALL_REDUCE_LATENCY_S = {1: 0.0, 2: 8e-6, 4: 12e-6, 8: 18e-6}  # one small NVLink all-reduce
MEMORY_FOR_WEIGHTS_AND_KV = 0.9  # of each GPU's HBM; the rest: activations, CUDA graphs


def llama3_70b_h100(tp: int) -> CostProfile:
    """Llama-3-70B bf16 over `tp` H100 SXM (NVLink), one step = one forward pass, as a roofline:

        overhead        all weights read once a step, split over tp GPUs, + 2 all-reduces a layer
        per token       2 x parameters FLOPs over tp GPUs at ACHIEVED_FLOPS, + its all-reduce
                        volume (hidden x 2 B, ring: 2 (tp - 1) / tp of it, 2 per layer) on NVLink
        per sampled seq ~40 us of host work (sampling, detokenizing, output)
        decode context  K and V of one cached token (80 x 8 x 128 x 2 x 2 B = 320 KB) over tp GPUs
        prefill pairs   4 x 128 x 64 heads x 80 layers FLOPs per (query, key) pair at ACHIEVED_FLOPS,
                        x 0.7 for the features' counting (see LLAMA_70B_A100X4 in simulate.py)
        KV blocks       what tp x 80 GB x 0.9 holds beyond the weights
    """
    weight_bytes = 2 * LLAMA3_70B_PARAMETERS
    kv_bytes_per_token = LLAMA3_70B_LAYERS * LLAMA3_70B_KV_HEADS * LLAMA3_70B_HEAD_DIM * 2 * 2
    num_all_reduces = 2 * LLAMA3_70B_LAYERS if tp > 1 else 0
    bandwidth = H100_BYTES_PER_S * ACHIEVED_BANDWIDTH
    overhead_s = weight_bytes / tp / bandwidth + num_all_reduces * ALL_REDUCE_LATENCY_S[tp]
    reduce_bytes = LLAMA3_70B_HIDDEN * 2 * 2 * (tp - 1) / tp
    per_token_s = (2 * LLAMA3_70B_PARAMETERS / (tp * H100_FLOPS * ACHIEVED_FLOPS)
                   + num_all_reduces * reduce_bytes / NVLINK_BYTES_PER_S)
    pair_flops = 4 * LLAMA3_70B_HEAD_DIM * 64 * LLAMA3_70B_LAYERS
    kv_memory = tp * H100_MEMORY * MEMORY_FOR_WEIGHTS_AND_KV - weight_bytes
    if kv_memory <= 0:
        raise ValueError(f"Llama-3-70B bf16 does not fit {tp} H100 80 GB")
    coefficients = CostCoefficients(
        overhead_s=overhead_s, per_scheduled_token_s=per_token_s, per_prefill_seq_s=0.0, per_sampled_seq_s=4.0e-5,
        per_decode_context_token_s=kv_bytes_per_token / tp / bandwidth,
        per_prefill_attention_pair_s=0.7 * pair_flops / (tp * H100_FLOPS * ACHIEVED_FLOPS))
    num_kv_blocks = int(kv_memory / kv_bytes_per_token) // 16
    return CostProfile(f"Llama-3-70B bf16, TP={tp} on H100-80GB SXM: roofline estimate (engine/bench/capacity.py)",
                       coefficients, num_kv_blocks, max_num_batched_tokens=2048, max_num_seqs=256,
                       tensor_parallel_size=tp)


def h100_llama3_70b_profiles() -> dict[str, CostProfile]:
    """TP 2, 4 and 8 (bf16 weights alone, 141 GB, do not fit one 80 GB GPU)."""
    return {f"llama3-70b-h100-tp{tp}": llama3_70b_h100(tp) for tp in (2, 4, 8)}


def plan_profiles(names: str | None) -> dict[str, CostProfile]:
    known = {**COST_PROFILES, **h100_llama3_70b_profiles()}
    if names is None:
        return h100_llama3_70b_profiles()
    unknown = [n for n in names.split(",") if n not in known]
    if unknown:
        raise ValueError(f"unknown cost profiles {unknown}: known are {sorted(known)}")
    return {name: known[name] for name in names.split(",")}


@dataclass(frozen=True)
class Candidate:
    profile_name: str
    tensor_parallel_size: int
    num_replicas: int

    @property
    def num_gpus(self) -> int:
        return self.tensor_parallel_size * self.num_replicas


@dataclass(frozen=True)
class PlanRow:
    candidate: Candidate
    slo_attainment: float
    request_goodput: float
    output_throughput: float
    p99_ttft_ms: float | None
    p99_tpot_ms: float | None


def plan(trace: Sequence[SimRequest], base: SimConfig, profiles: dict[str, CostProfile],
         gpu_budget: int) -> list[PlanRow]:
    """Every (profile, replica count) within the budget, simulated on the same trace."""
    rows = []
    todo = [(name, profile, replicas) for name, profile in profiles.items()
            for replicas in range(1, gpu_budget // profile.tensor_parallel_size + 1)]
    for name, profile, replicas in tqdm(todo, desc="capacity plan"):
        config = replace(base, num_replicas=replicas, max_num_batched_tokens=profile.max_num_batched_tokens,
                         max_num_seqs=profile.max_num_seqs, num_kv_blocks=profile.num_kv_blocks,
                         block_size=profile.block_size, max_model_len=profile.max_model_len)
        summary = simulate(trace, config, profile.cost_model()).summary(config.slo_ttft_ms, config.slo_tpot_ms)
        rows.append(PlanRow(Candidate(name, profile.tensor_parallel_size, replicas), summary["slo_attainment"],
                            summary["request_goodput"], summary["output_throughput"], summary.get("p99_ttft_ms"),
                            summary.get("p99_tpot_ms")))
    return rows


def best(rows: Sequence[PlanRow], target_attainment: float) -> PlanRow | None:
    """The fewest accelerators meeting the target; among those, the highest goodput."""
    meeting = [row for row in rows if row.slo_attainment >= target_attainment]
    return min(meeting, key=lambda r: (r.candidate.num_gpus, -r.request_goodput), default=None)


def plan_table(rows: Sequence[PlanRow], target_attainment: float) -> str:
    chosen = best(rows, target_attainment)
    lines = ["| profile | TP | replicas | GPUs | SLO attainment | goodput req/s | output tok/s | p99 TTFT ms | "
             "p99 TPOT ms |", "|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (r.candidate.num_gpus, r.candidate.profile_name)):
        c = row.candidate
        mark = " **<- plan**" if row is chosen else ""
        lines.append(f"| {c.profile_name} | {c.tensor_parallel_size} | {c.num_replicas} | {c.num_gpus} | "
                     f"{row.slo_attainment:.3f} | {row.request_goodput:.2f} | {row.output_throughput:.0f} | "
                     f"{_ms(row.p99_ttft_ms)} | {_ms(row.p99_tpot_ms)}{mark} |")
    verdict = (f"Plan: {chosen.candidate.num_replicas} x {chosen.candidate.profile_name} "
               f"({chosen.candidate.num_gpus} GPUs) meets {target_attainment:.0%} SLO attainment"
               if chosen is not None else f"No candidate meets {target_attainment:.0%} SLO attainment")
    return "\n".join(lines) + "\n\n" + verdict + "\n"


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.0f}"


def main(args: argparse.Namespace) -> None:
    """`engine bench simulate --plan-gpus N`: the plan for the trace the other flags describe."""
    try:
        profiles = plan_profiles(args.plan_profiles)
        if args.slo_ttft_ms is None and args.slo_tpot_ms is None:
            raise ValueError("a capacity plan needs --slo-ttft-ms and/or --slo-tpot-ms")
        base = sim_config_from_args(args, next(iter(profiles.values())))
        trace = load_trace(args, replace(base, max_model_len=min(p.max_model_len for p in profiles.values())))
        rows = plan(trace, base, profiles, args.plan_gpus)
    except (ValueError, OSError) as e:
        raise SystemExit(f"engine bench simulate --plan-gpus: {e}") from None
    table = plan_table(rows, args.plan_target)
    print(table)
    if args.save_result is not None:
        args.save_result.parent.mkdir(parents=True, exist_ok=True)
        args.save_result.with_suffix(".md").write_text(table)
        print(f"saved {args.save_result.with_suffix('.md')}")
