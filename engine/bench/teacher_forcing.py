"""Teacher-forced logits of one token sequence through the engine's own model, in one prefill.

Quality measurements (benchmarks/weight_formats.py's perplexity, the elastic torch model's parity
test) need the served model's logits at every position of a known sequence, which generation never
returns.  The sequence runs as one prefill chunk from position 0: a ForwardBatch built by the
runner's own builder, KV blocks from the engine's KV manager (freed after), the LM head on the
asked rows only.
"""

from __future__ import annotations

from typing import Any

import torch

SCORE_REQUEST_ID = "teacher-forcing"


def prefill_logits(llm: Any, token_ids: list[int], rows: torch.Tensor) -> torch.Tensor:
    """fp32 logits [len(rows), vocab] of `rows` (positions in `token_ids`) of one prefill."""
    engine, runner = llm.engine, llm.engine.runner
    if not engine.kv.allocate_slots(SCORE_REQUEST_ID, len(token_ids)):
        raise RuntimeError(f"the KV cache cannot hold {len(token_ids)} tokens: score shorter sequences")
    try:
        batch = prefill_batch(token_ids, engine.kv.block_table(SCORE_REQUEST_ID), runner)
        batch.logits_indices = rows.to(runner.device)
        with torch.inference_mode():
            hidden = runner.model(batch, runner.kv_caches)
            return runner.model.compute_logits(hidden[batch.logits_indices])
    finally:
        engine.kv.free(SCORE_REQUEST_ID)


def prefill_batch(token_ids: list[int], block_ids: list[int], runner: Any) -> Any:
    """The ForwardBatch of one sequence computed from position 0 in one chunk, built the way the
    runner builds a step's (so rows, slots and attention metadata follow the engine's rules)."""
    from engine.request import Request
    from engine.sampling_params import SamplingParams
    from engine.scheduler.output import NewRequestData, ScheduledRequest, SchedulerOutput
    from engine.worker.forward_batch_builder import build_forward_batch
    from engine.worker.request_states import RequestStates

    request = Request(SCORE_REQUEST_ID, list(token_ids), SamplingParams(temperature=0.0), max_tokens=1)
    scheduled = ScheduledRequest(request, num_computed_tokens=0, num_scheduled_tokens=len(token_ids),
                                 block_ids=block_ids, samples=True, new_request=NewRequestData.of(request))
    states = RequestStates()  # the batch's own: the runner's copy of running requests is left alone
    states.update(SchedulerOutput([scheduled], num_batched_tokens=len(token_ids)))
    return build_forward_batch([scheduled], states, runner.block_size, runner.device)
