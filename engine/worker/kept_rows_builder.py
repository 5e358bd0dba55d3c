"""SchedulerOutput -> one KeptRows per deep KV group: the rows the layers from each prune layer run.

Per scheduled request i, in the step's order (c, n its group-0 range; b_s, m_s its range in deep
group s, ScheduledRequest.num_kept_*): a request with m_s == 0 (pruned, still in stage A) has no
sequence in any deep group; the others keep the step's order, so decodes (m == 1) stay first.
Group s's rows of a request, and where each comes from (T = the previous group's rows, r0 = the
request's first row there):

    plain:            rows r0 .. r0 + n - 1 of the previous group   positions c .. c + n - 1
    stage-B step:     K_s kept prompt rows                          positions chosen at l_s (placeholders)
                        stage 1: hidden-cache rows T + j .. T + j + K_1 - 1
                        later:   the previous group's rows of the kept candidates (set at l_s)
                      then the previous group's rows of the chunk's output tokens
                                                                    positions P .. c + n - 1

The attention metadata indexes group s's table by its own index b_s .. b_s + m_s - 1, not by
position: the kept tokens sit side by side in the group's blocks, their positions live only in RoPE.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.model.forward_batch import ForwardBatch, KeptRows, PromptSelection
from engine.scheduler.output import ScheduledRequest
from engine.worker.forward_batch_builder import _block_tables, _elastic_rows, _to_device, attention_metadata
from engine.worker.request_states import RequestState, RequestStates


@dataclass(frozen=True, slots=True)
class _Layout:
    """A group's rows of the step: each scheduled request's first row and row count (0: none)."""

    first_rows: np.ndarray  # [len(scheduled)]
    counts: np.ndarray  # [len(scheduled)]
    num_rows: int


def build_kept_rows(scheduled: list[ScheduledRequest], states: RequestStates, batch: ForwardBatch,
                    block_size: int, device: torch.device,
                    elastic_levels: Sequence[int] | None = None) -> list[KeptRows]:
    to_device = _to_device(device)
    num_stages = len(scheduled[0].kept_block_ids)
    starts = batch.attention.query_start_loc_cpu
    layout = _Layout(np.asarray(starts[:-1]), np.diff(starts), batch.num_tokens)
    groups: list[KeptRows] = []
    parents: dict[str, PromptSelection] = {}
    positions = batch.positions
    for stage in range(num_stages):
        kept, layout = _stage_rows(stage, scheduled, states, layout, positions, parents, block_size, to_device,
                                   elastic_levels)
        parents, positions = {s.request_id: s for s in kept.selections}, kept.positions
        groups.append(kept)
    return groups


def _stage_rows(stage: int, scheduled: list[ScheduledRequest], states: RequestStates, previous: _Layout,
                previous_positions: torch.Tensor, parents: dict[str, PromptSelection], block_size: int, to_device,
                elastic_levels: Sequence[int] | None) -> tuple[KeptRows, _Layout]:
    """Deep group `stage`'s rows, each from the previous group's (`previous`, at
    `previous_positions`); and their layout."""
    counts = np.array([s.num_kept_scheduled_tokens[stage] for s in scheduled], dtype=np.int64)
    rows = [s for s, count in zip(scheduled, counts) if count > 0]
    layout = _Layout(np.concatenate([[0], np.cumsum(counts)[:-1]]), counts, int(counts.sum()))
    if not rows:  # only pruned prompts' stage-A chunks: the deep layers have nothing to run
        empty = to_device(np.zeros(0, dtype=np.int64))
        return KeptRows(attention=None, request_ids=[], positions=empty, logits_indices=empty, elastic=None,
                        source_rows=None, selections=[]), layout
    sources, positions, selections = _row_sources(stage, scheduled, states, previous, layout, parents,
                                                  block_size, to_device)
    is_same_rows = not selections and sources.shape[0] == previous.num_rows
    kept = KeptRows(attention=_kept_attention(rows, stage, block_size, to_device),
                    request_ids=[s.request_id for s in rows],
                    # The same rows: the same tensor (so RoPE tables are not rebuilt).
                    positions=previous_positions if is_same_rows else to_device(positions),
                    logits_indices=_logits_indices(rows, stage, to_device),
                    elastic=None if elastic_levels is None else _elastic_rows(
                        rows, counts[counts > 0], elastic_levels, to_device),
                    source_rows=None if is_same_rows else to_device(sources), selections=selections)
    return kept, layout


def _row_sources(stage: int, scheduled: list[ScheduledRequest], states: RequestStates, previous: _Layout,
                 layout: _Layout, parents: dict[str, PromptSelection], block_size: int, to_device
                 ) -> tuple[np.ndarray, np.ndarray, list[PromptSelection]]:
    """Each of the group's rows: its source row and position (module docstring), and the
    selections of the requests whose stage-B step this is."""
    sources: list[np.ndarray] = []
    positions: list[np.ndarray] = []
    selections: list[PromptSelection] = []
    num_cache_rows = 0
    for index, s in enumerate(scheduled):
        if layout.counts[index] == 0:
            continue
        state, plan = states[s.request_id], states[s.request_id].prune_plan
        first_row = int(previous.first_rows[index])
        end, num_done = first_row + int(previous.counts[index]), s.num_computed_tokens + s.num_scheduled_tokens
        if plan is not None and plan.is_stage_b_step(s.num_computed_tokens, s.num_scheduled_tokens):
            num_kept, kept_rows_start = plan.kept_per_stage[stage], int(layout.first_rows[index])
            if stage == 0:  # kept rows from the hidden cache, appended after the step's rows
                selection = _first_selection(s, state, first_row, kept_rows_start, block_size, to_device)
                sources.append(previous.num_rows + num_cache_rows + np.arange(num_kept))
                num_cache_rows += num_kept
                first_row += plan.num_prompt_tokens - s.num_computed_tokens
            else:  # kept rows among the previous group's candidate rows, set at the prune layer
                selection = _later_selection(stage, s, state, parents[s.request_id], first_row, kept_rows_start,
                                             block_size, to_device)
                sources.append(np.zeros(num_kept, dtype=np.int64))
                first_row += plan.kept_per_stage[stage - 1]
            selections.append(selection)
            positions.append(np.zeros(num_kept, dtype=np.int64))  # set at the prune layer
        sources.append(np.arange(first_row, end))
        positions.append(np.arange(num_done - (end - first_row), num_done))
    return np.concatenate(sources), np.concatenate(positions), selections


def _kept_attention(rows: list[ScheduledRequest], stage: int, block_size: int, to_device):
    starts = np.array([s.num_kept_computed_tokens[stage] for s in rows], dtype=np.int64)
    counts = np.array([s.num_kept_scheduled_tokens[stage] for s in rows], dtype=np.int64)
    return attention_metadata(starts, counts, _block_tables([s.kept_block_ids[stage] for s in rows]),
                              block_size, to_device)


def _logits_indices(rows: list[ScheduledRequest], stage: int, to_device) -> torch.Tensor:
    ends = np.cumsum([s.num_kept_scheduled_tokens[stage] for s in rows])
    return to_device(np.array([end - 1 for end, s in zip(ends, rows) if s.samples], dtype=np.int64))


def _slots(block_ids: list[int], count: int, block_size: int) -> np.ndarray:
    """The cache slots of a table's indices 0 .. count - 1."""
    indices = np.arange(count)
    return np.asarray(block_ids, dtype=np.int64)[indices // block_size] * block_size + indices % block_size


def _first_selection(s: ScheduledRequest, state: RequestState, first_row: int, kept_rows_start: int,
                     block_size: int, to_device) -> PromptSelection:
    """The request's first cut: its window rows in this step, its prompt's group-0 slots."""
    plan = state.prune_plan
    window_end = first_row + plan.num_prompt_tokens - s.num_computed_tokens
    return PromptSelection(
        request_id=s.request_id, num_candidates=plan.num_prompt_tokens, num_kept=plan.kept_per_stage[0],
        window=plan.window, window_rows=(window_end - plan.num_score_queries, window_end),
        context_slots=to_device(_slots(s.block_ids, plan.num_prompt_tokens, block_size)),
        kept_rows_start=kept_rows_start, scoring=plan.scoring, seed=_prompt_seed(state.prompt_token_ids),
        **_known(state, 0, to_device))


def _later_selection(stage: int, s: ScheduledRequest, state: RequestState, parent: PromptSelection,
                     candidate_rows_start: int, kept_rows_start: int, block_size: int, to_device) -> PromptSelection:
    """A later cut: the previous stage's kept rows are the candidates, in the previous group."""
    plan = state.prune_plan
    num_candidates = plan.kept_per_stage[stage - 1]
    window_end = candidate_rows_start + num_candidates
    return PromptSelection(
        request_id=s.request_id, num_candidates=num_candidates, num_kept=plan.kept_per_stage[stage],
        window=plan.window, window_rows=(window_end - plan.num_score_queries, window_end),
        context_slots=to_device(_slots(s.kept_block_ids[stage - 1], num_candidates, block_size)),
        kept_rows_start=kept_rows_start, scoring=plan.scoring, seed=_prompt_seed(state.prompt_token_ids) + stage,
        parent=parent, candidate_rows_start=candidate_rows_start, **_known(state, stage, to_device))


def _known(state: RequestState, stage: int, to_device) -> dict:
    """A recompute's kept positions of this stage (given, not scored again)."""
    known = state.kept_prompt_positions
    if known is None:
        return {}
    return {"kept_positions": to_device(np.array(known[stage], dtype=np.int64)), "is_replayed": True}


def _prompt_seed(prompt_token_ids: list[int]) -> int:
    """A seed that is a function of the prompt alone (random scoring draws the same on a recompute)."""
    digest = hashlib.blake2b(array("q", prompt_token_ids).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)
