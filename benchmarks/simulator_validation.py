"""Does the simulator predict the real engine?  One ShareGPT trace, served for real and simulated.

    .venv/bin/python benchmarks/simulator_validation.py                  # 64 requests at 1.5 req/s
    .venv/bin/python benchmarks/simulator_validation.py --num-prompts 24 # a reduced run

1. Load the engine (SmolLM2-135M, bf16, CPU) and fit the step cost model: `profile_step_costs`
   (synthetic steps, a few seconds), then refine it online (`observe`) on the timed steps of a
   warm-up trace, served for real: other ShareGPT requests at the same rate (steps that other
   processes competed with are left out).
2. Serve the measured trace for real: ShareGPT prompts (seeded), reference output lengths capped
   at --max-output-len, EOS ignored, Poisson arrivals replayed against the wall clock (requests
   whose arrival time has passed are added, then the engine steps), the way `engine bench serve`
   would send them to a server.  TTFT and token times come from the engine's step outputs.
3. Simulate the same trace (same token ids, arrival times, scheduler settings and KV size) with
   the profile-only model and with the refined model.
4. Print simulated / real mean TTFT and throughput (the goal: within 15%), and save
   benchmarks/results/simulator_validation.json (git-ignored) and .png (TTFT and E2EL CDFs).

The machine has two shared cores: the script waits (up to --max-wait-s) for the 1-minute load
average to drop under --max-load, and records the load beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.bench.arrivals import arrival_times
from engine.bench.datasets import sample_sharegpt
from engine.bench.metrics import RequestRecord, summarize
from engine.bench.simulate import SimConfig, SimRequest, simulate
from engine.profiling import profile_step_costs, timed_step
from engine.scheduler.cost_model import OnlineFitConfig, StepCostModel, StepSample, relative_errors

RESULTS = Path(__file__).parent / "results"
# Steps during which other processes kept more than this share of the cores busy are not used to
# fit or judge step-time predictions (two shared cores: one busy neighbour doubles a step).
MAX_OTHER_CPU_SHARE = 0.1
HEADLINE = ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "mean_itl_ms", "mean_e2el_ms",
            "request_throughput", "output_throughput", "duration")


@dataclass(frozen=True)
class TraceRequest:
    prompt_token_ids: tuple[int, ...]
    output_len: int
    arrival_s: float  # from the trace's start


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--num-warmup-prompts", type=int, default=24)
    parser.add_argument("--request-rate", type=float, default=1.5,
                        help="Poisson arrivals, requests/s (the engine serves about 1.5 of these)")
    parser.add_argument("--max-output-len", type=int, default=256, help="cap on the reference answer's length")
    parser.add_argument("--max-prompt-len", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-load", type=float, default=1.5, help="wait for a lower 1-minute load average")
    parser.add_argument("--max-wait-s", type=float, default=600.0)
    parser.add_argument("--output", type=Path, default=RESULTS / "simulator_validation.json")
    return parser.parse_args()


class OtherCpuMeter:
    """The share of all cores that other processes used since this meter started (from /proc):
    on a shared machine, what the real run's timings competed with."""

    def __init__(self) -> None:
        self._start = (self._busy_ticks(), self._own_ticks(), time.time())

    def share(self) -> float:
        busy, own, started = self._start
        others_s = ((self._busy_ticks() - busy) - (self._own_ticks() - own)) / os.sysconf("SC_CLK_TCK")
        return max(0.0, others_s / ((time.time() - started) * (os.cpu_count() or 1)))

    @staticmethod
    def _busy_ticks() -> int:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, open("/proc/stat").readline().split()[1:9])
        return user + nice + system + irq + softirq + steal

    @staticmethod
    def _own_ticks() -> int:
        fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime


def wait_for_quiet(max_load: float, max_wait_s: float) -> float:
    """The 1-minute load average once it is under max_load, or when max_wait_s has passed."""
    deadline = time.time() + max_wait_s
    while os.getloadavg()[0] >= max_load and time.time() < deadline:
        time.sleep(10)
    return os.getloadavg()[0]


def build_trace(tokenizer: Any, num_prompts: int, rate: float, seed: int, args: argparse.Namespace) -> list[TraceRequest]:
    requests = sample_sharegpt(tokenizer, num_prompts, seed=seed, max_prompt_len=args.max_prompt_len,
                               max_output_len=args.max_output_len)
    times = arrival_times(num_prompts, rate, seed=seed)
    return [TraceRequest(tuple(tokenizer.encode(r.prompt)), r.expected_output_len, t) for r, t in zip(requests, times)]


# ---- real -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class MeasuredStep:
    sample: StepSample
    other_cpu_share: float  # of all cores, used by other processes while the step ran


def serve_for_real(engine: Any, trace: list[TraceRequest]) -> tuple[list[RequestRecord], float, list[MeasuredStep]]:
    """Replay the trace against the wall clock: per-request records, the duration and every step."""
    from engine import SamplingParams

    start = time.time()
    token_times: dict[str, list[float]] = {str(i): [] for i in range(len(trace))}
    steps: list[MeasuredStep] = []
    next_index = 0
    while next_index < len(trace) or engine.has_unfinished_requests():
        now = time.time() - start
        while next_index < len(trace) and trace[next_index].arrival_s <= now:
            request = trace[next_index]
            params = SamplingParams(temperature=0.0, max_tokens=request.output_len, ignore_eos=True)
            engine.add_request(str(next_index), list(request.prompt_token_ids), params,
                               arrival_time=start + request.arrival_s)
            next_index += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, trace[next_index].arrival_s - (time.time() - start)))
            continue
        meter = OtherCpuMeter()
        outputs, sample = timed_step(engine)
        stamp = time.time() - start
        for output in outputs:
            token_times[output.request_id].append(stamp)
        if sample is not None:
            steps.append(MeasuredStep(sample, meter.share()))
    records = [_record(request, token_times[str(i)]) for i, request in enumerate(trace)]
    return records, max(times[-1] for times in token_times.values()), steps


def _record(request: TraceRequest, times: list[float]) -> RequestRecord:
    return RequestRecord(prompt_len=len(request.prompt_token_ids), output_len=len(times),
                         ttft_s=times[0] - request.arrival_s, itl_s=np.diff(times).tolist(),
                         e2el_s=times[-1] - request.arrival_s, arrival_time_s=request.arrival_s,
                         start_time_s=request.arrival_s)


# ---- simulated ------------------------------------------------------------------------------

def sim_config(engine: Any) -> SimConfig:
    """The simulated replica the engine is: its budget, seats, KV blocks and model length."""
    scheduler = engine.scheduler
    return SimConfig(policy="fcfs", max_num_batched_tokens=scheduler.max_num_batched_tokens,
                     max_num_seqs=scheduler.max_num_seqs, num_kv_blocks=engine.kv.pool.num_blocks,
                     block_size=engine.kv.block_size, max_model_len=engine.max_model_len,
                     enable_prefix_caching=engine.kv.enable_prefix_caching)


def simulate_trace(trace: list[TraceRequest], config: SimConfig, model: StepCostModel) -> dict[str, Any]:
    sim_trace = [SimRequest(len(r.prompt_token_ids), r.output_len, r.arrival_s, r.prompt_token_ids) for r in trace]
    result = simulate(sim_trace, config, model)
    return {**summarize(result.records, result.duration_s), "sim_wall_s": result.wall_s, "num_steps": result.num_steps}


# ---- comparison -----------------------------------------------------------------------------

def ratios(sim: dict[str, Any], real: dict[str, Any]) -> dict[str, float]:
    return {key: sim[key] / real[key] for key in HEADLINE if real.get(key)}


def print_table(real: dict[str, Any], sims: dict[str, dict[str, Any]]) -> None:
    names = list(sims)
    print(f"{'metric':<22}{'real':>12}" + "".join(f"{name:>18}{'ratio':>8}" for name in names))
    for key in HEADLINE:
        row = f"{key:<22}{real[key]:>12.2f}"
        for name in names:
            row += f"{sims[name][key]:>18.2f}{sims[name][key] / real[key]:>8.3f}"
        print(row)


def plot(path: Path, real: dict[str, Any], sims: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, key, title in ((axes[0], "ttfts", "TTFT"), (axes[1], "latencies", "end-to-end latency")):
        for name, run, style in (("real engine", real, "-"), *((f"simulated, {n}", s, "--") for n, s in sims.items())):
            values = np.sort(np.array([v for v in run[key] if v is not None]) * 1000.0)
            axis.plot(values, np.arange(1, len(values) + 1) / len(values), style, label=name)
        axis.set_xscale("log")
        axis.set_xlabel(f"{title} (ms, log scale)")
        axis.set_ylabel("fraction of requests")
        axis.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    fig.suptitle(f"Simulator vs real engine: {len(real['ttfts'])} ShareGPT requests")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    from engine import LLM

    load = {"before": wait_for_quiet(args.max_load, args.max_wait_s)}
    llm = LLM(max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs)
    engine = llm.engine
    started = time.perf_counter()
    profile = profile_step_costs(engine)
    profile_s = time.perf_counter() - started
    profiled = StepCostModel.fit(profile, description="profile_step_costs only", one_call=engine.runner.one_call_steps)
    print(f"profiled {len(profile)} steps in {profile_s:.1f} s: {profiled.coefficients}")

    warmup = build_trace(engine.tokenizer, args.num_warmup_prompts, args.request_rate, args.seed + 1000, args)
    _, _, warmup_steps = serve_for_real(engine, warmup)
    clean = [step.sample for step in warmup_steps if step.other_cpu_share < MAX_OTHER_CPU_SHARE]
    refined = StepCostModel(profiled.coefficients, description="profile, refined on the warm-up trace",
                            online=OnlineFitConfig(window_size=max(1, len(clean))), one_call=profiled.one_call)
    for sample in clean:
        refined.observe(sample.features, sample.elapsed_s)
    refined.refit()  # the last partial interval too
    print(f"refined on {len(clean)} of {len(warmup_steps)} warm-up steps (the others competed with other "
          f"processes): {refined.coefficients}")

    trace = build_trace(engine.tokenizer, args.num_prompts, args.request_rate, args.seed, args)
    load["before_real"] = os.getloadavg()[0]
    meter = OtherCpuMeter()
    records, duration_s, steps = serve_for_real(engine, trace)
    load["after_real"] = os.getloadavg()[0]
    load["other_processes_cpu_share_during_real"] = meter.share()
    load["other_processes_cpu_share_during_warmup"] = float(np.mean([s.other_cpu_share for s in warmup_steps]))
    print(f"load average and other processes' share of the cores: {load}")
    real = summarize(records, duration_s)
    config = sim_config(engine)
    sims = {"profiled": simulate_trace(trace, config, profiled), "refined": simulate_trace(trace, config, refined)}

    print_table(real, sims)
    samples = [step.sample for step in steps if step.other_cpu_share < MAX_OTHER_CPU_SHARE]
    step_errors = {name: float(np.mean(relative_errors(model, samples)))
                   for name, model in (("profiled", profiled), ("refined", refined))}
    print(f"mean relative error of step-time predictions on the measured trace's {len(samples)} uncontended steps: "
          + ", ".join(f"{name} {error:+.3f}" for name, error in step_errors.items()))
    save(args, real, sims, step_errors, load, profile, profile_s, profiled, refined, config, steps)


def save(args: argparse.Namespace, real: dict[str, Any], sims: dict[str, dict[str, Any]], step_errors: dict[str, float],
         load: dict[str, float], profile: list[StepSample], profile_s: float, profiled: StepCostModel,
         refined: StepCostModel, config: SimConfig, steps: list[MeasuredStep]) -> None:
    args.output.parent.mkdir(parents=True, exist_ok=True)
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": load, "profile_s": profile_s,
              "sim_config": asdict(config), "cost_models": {"profiled": profiled.to_dict(), "refined": refined.to_dict()},
              "profile_steps": [[*s.features.as_tuple(), s.elapsed_s] for s in profile],
              "ratios": {name: ratios(sim, real) for name, sim in sims.items()},
              "step_prediction_mean_relative_error": step_errors, "real": real, "simulated": sims,
              # Every measured step: StepFeatures fields in order, seconds, other processes' CPU share.
              "real_steps": [[*s.sample.features.as_tuple(), s.sample.elapsed_s, s.other_cpu_share] for s in steps]}
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    plot(args.output.with_suffix(".png"), real, sims)
    print(f"saved {args.output} and {args.output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
