"""SchedulerOutput -> KeptRows: group B's rows of one step (the layers from the prune layer).

Per scheduled request i, in the step's order (c, n its group-A range; b, m its group-B range,
ScheduledRequest.num_kept_*): a request with m == 0 (pruned, still in stage A) has no group-B
sequence; the others keep the step's order, so decodes (m == 1) stay first.  Group-B rows of a
request, and where each comes from (T = the step's group-A rows, r0 = the request's first one):

    plain:          rows r0 .. r0 + n - 1                       positions c .. c + n - 1
    stage-B step:   cache rows T + j .. T + j + K - 1           positions chosen at l* (placeholders)
                    then rows r0 + (P - c) .. r0 + n - 1        positions P .. c + n - 1

The attention metadata indexes group B's table by group-B index b .. b + m - 1, not by position:
the kept tokens sit side by side in group B's blocks, their positions live only in RoPE.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

import numpy as np
import torch

from engine.model.forward_batch import ForwardBatch, KeptRows, PromptSelection
from engine.scheduler.output import ScheduledRequest
from engine.worker.forward_batch_builder import _block_tables, _elastic_rows, _to_device, attention_metadata
from engine.worker.request_states import RequestState, RequestStates


def build_kept_rows(scheduled: list[ScheduledRequest], states: RequestStates, batch: ForwardBatch,
                    block_size: int, device: torch.device,
                    elastic_levels: Sequence[int] | None = None) -> KeptRows:
    to_device = _to_device(device)
    rows = [s for s in scheduled if s.num_kept_scheduled_tokens > 0]
    if not rows:  # only pruned prompts' stage-A chunks: the layers from l* have nothing to run
        empty = to_device(np.zeros(0, dtype=np.int64))
        return KeptRows(attention=None, request_ids=[], positions=empty, logits_indices=empty, elastic=None,
                        source_rows=None, selections=[])
    row_starts = batch.attention.query_start_loc_cpu
    sources: list[np.ndarray] = []
    positions: list[np.ndarray] = []
    selections: list[PromptSelection] = []
    num_cache_rows, num_kept_rows = 0, 0
    for index, s in enumerate(scheduled):
        if s.num_kept_scheduled_tokens == 0:
            continue
        state, first_row = states[s.request_id], row_starts[index]
        plan, end = state.prune_plan, s.num_computed_tokens + s.num_scheduled_tokens
        if plan is not None and plan.is_stage_b_step(s.num_computed_tokens, s.num_scheduled_tokens):
            selections.append(_selection(s, state, first_row, num_kept_rows, block_size, to_device))
            sources.append(batch.num_tokens + num_cache_rows + np.arange(plan.num_kept_prompt_tokens))
            positions.append(np.zeros(plan.num_kept_prompt_tokens, dtype=np.int64))
            num_cache_rows += plan.num_kept_prompt_tokens
            first_row += plan.num_prompt_tokens - s.num_computed_tokens
        sources.append(np.arange(first_row, row_starts[index + 1]))
        positions.append(np.arange(end - (row_starts[index + 1] - first_row), end))
        num_kept_rows += s.num_kept_scheduled_tokens
    source_rows = np.concatenate(sources)
    is_same_rows = source_rows.shape[0] == batch.num_tokens and bool((source_rows == np.arange(batch.num_tokens)).all())
    return KeptRows(attention=_kept_attention(rows, block_size, to_device),
                    request_ids=[s.request_id for s in rows],
                    positions=batch.positions if is_same_rows else to_device(np.concatenate(positions)),
                    logits_indices=_logits_indices(rows, to_device),
                    elastic=None if elastic_levels is None else _elastic_rows(
                        rows, np.array([s.num_kept_scheduled_tokens for s in rows]), elastic_levels, to_device),
                    source_rows=None if is_same_rows else to_device(source_rows), selections=selections)


def _kept_attention(rows: list[ScheduledRequest], block_size: int, to_device):
    starts = np.array([s.num_kept_computed_tokens for s in rows], dtype=np.int64)
    counts = np.array([s.num_kept_scheduled_tokens for s in rows], dtype=np.int64)
    return attention_metadata(starts, counts, _block_tables([s.kept_block_ids for s in rows]), block_size, to_device)


def _logits_indices(rows: list[ScheduledRequest], to_device) -> torch.Tensor:
    ends = np.cumsum([s.num_kept_scheduled_tokens for s in rows])
    return to_device(np.array([end - 1 for end, s in zip(ends, rows) if s.samples], dtype=np.int64))


def _selection(s: ScheduledRequest, state: RequestState, first_row: int, kept_rows_start: int, block_size: int,
               to_device) -> PromptSelection:
    """The request's stage-B choice: its window rows in this step, its prompt's group-A slots."""
    plan = state.prune_plan
    num_prompt = plan.num_prompt_tokens
    positions = np.arange(num_prompt)
    block_ids = np.array(s.block_ids, dtype=np.int64)
    window_end = first_row + num_prompt - s.num_computed_tokens
    known = state.kept_prompt_positions
    return PromptSelection(
        request_id=s.request_id, num_prompt_tokens=num_prompt, num_kept=plan.num_kept_prompt_tokens,
        window=plan.window, window_rows=(window_end - plan.window, window_end),
        context_slots=to_device(block_ids[positions // block_size] * block_size + positions % block_size),
        kept_rows_start=kept_rows_start, scoring=plan.scoring, seed=_prompt_seed(state.prompt_token_ids),
        kept_positions=None if known is None else to_device(np.array(known, dtype=np.int64)),
        is_replayed=known is not None)


def _prompt_seed(prompt_token_ids: list[int]) -> int:
    """A seed that is a function of the prompt alone (random scoring draws the same on a recompute)."""
    digest = hashlib.blake2b(array("q", prompt_token_ids).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
