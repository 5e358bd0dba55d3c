"""When does MLFQ beat FCFS on mean job completion time?  The simulator's answer, in seconds.

MLFQ favours the requests with the least service so far.  That shortens the mean completion
time only when attained service predicts remaining service, i.e. when output lengths are
heavy-tailed (coefficient of variation above 1).  ShareGPT's reference answers are not
(CV about 0.7), so on ShareGPT FCFS is hard to beat (benchmarks/policies.py).  This script runs
both policies in the simulator on ShareGPT's output lengths and on log-normal lengths of rising
spread, at 100% and 130% of capacity, with the cost model benchmarks/policies.py fitted on real
steps when its JSON holds one, else the built-in smollm2-cpu profile (also fitted on real steps).

    .venv/bin/python benchmarks/mlfq_tails.py      # writes benchmarks/results/mlfq_tails.md
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engine.bench.arrivals import arrival_times
from engine.bench.metrics import summarize
from engine.bench.datasets import sample_sharegpt
from engine.bench.simulate import SMOLLM2_CPU, SimConfig, SimRequest, simulate
from engine.model.loader import load_tokenizer, resolve_model
from engine.scheduler.cost_model import StepCostModel

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks/results"
NUM_REQUESTS = 300
MAX_NUM_SEQS = 16


def cost_model() -> StepCostModel:
    fitted = RESULTS / "policies.json"
    if fitted.exists():
        data = json.loads(fitted.read_text()).get("cost_model")
        try:
            return StepCostModel.from_dict({k: v for k, v in (data or {}).items() if k != "num_samples"})
        except ValueError:  # none saved, or saved by an older version of the cost model
            pass
    return SMOLLM2_CPU.cost_model()


def workloads(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(prompt lengths, output lengths): ShareGPT's own, then log-normal outputs of rising spread."""
    samples = sample_sharegpt(load_tokenizer(resolve_model(None)), NUM_REQUESTS, max_prompt_len=1024,
                              max_model_len=4096)
    prompts = np.array([s.prompt_len for s in samples])
    out = {"ShareGPT answers": (prompts, np.array([s.expected_output_len for s in samples]))}
    for sigma in (0.5, 1.0, 1.5):
        outputs = np.clip(rng.lognormal(np.log(150), sigma, NUM_REQUESTS).astype(int), 4, 1500)
        out[f"log-normal, sigma {sigma}"] = (prompts, outputs)
    return out


def mean_jct_s(prompts: np.ndarray, outputs: np.ndarray, rate: float, policy: str, model: StepCostModel) -> float:
    times = arrival_times(len(prompts), rate, 1.0, 0)
    trace = [SimRequest(int(p), int(o), t) for p, o, t in zip(prompts, outputs, times)]
    result = simulate(trace, SimConfig(policy=policy, max_num_seqs=MAX_NUM_SEQS, max_model_len=4096), model)
    return summarize(result.records, result.duration_s)["mean_e2el_ms"] / 1000


def main() -> None:
    model = cost_model()
    lines = ["| output lengths | CV | load | FCFS mean JCT s | MLFQ mean JCT s | MLFQ / FCFS |", "|---|---|---|---|---|---|"]
    for name, (prompts, outputs) in workloads(np.random.default_rng(0)).items():
        everything_at_once = [SimRequest(int(p), int(o), 0.0) for p, o in zip(prompts, outputs)]
        run = simulate(everything_at_once, SimConfig(max_num_seqs=MAX_NUM_SEQS, max_model_len=4096), model)
        capacity = len(prompts) / run.duration_s
        for load in (1.0, 1.3):
            fcfs, mlfq = (mean_jct_s(prompts, outputs, load * capacity, p, model) for p in ("fcfs", "mlfq"))
            lines.append(f"| {name} | {outputs.std() / outputs.mean():.2f} | {load:.0%} | {fcfs:.1f} | {mlfq:.1f} "
                         f"| {mlfq / fcfs:.2f} |")
            print(lines[-1], flush=True)
    (RESULTS / "mlfq_tails.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
