"""SchedulerOutput -> ForwardBatch: the rows, positions, slots and attention metadata of one step.

Token ranges per scheduled request i (c = num_computed_tokens, n = num_scheduled_tokens):

    request i's tokens:  | computed (KV cached) | scheduled this step | rest |
                         0                      c                     c + n
    rows of the batch:   query_start_loc[i] .. query_start_loc[i + 1] - 1, positions c .. c + n - 1

Decodes (n == 1) come first: the scheduler sorts them ahead, and attention relies on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from engine.model.attention_backends.metadata import AttentionMetadata
from engine.model.forward_batch import ElasticRows, ForwardBatch
from engine.scheduler.output import ScheduledRequest
from engine.worker.request_states import RequestStates


def build_forward_batch(scheduled: list[ScheduledRequest], states: RequestStates, block_size: int,
                        device: torch.device, elastic_levels: Sequence[int] | None = None) -> ForwardBatch:
    """`elastic_levels`: the model's level values (index 0 the full model), None if it is not elastic."""
    starts = np.array([s.num_computed_tokens for s in scheduled], dtype=np.int64)
    counts = np.array([s.num_scheduled_tokens for s in scheduled], dtype=np.int64)
    query_start_loc = np.zeros(len(scheduled) + 1, dtype=np.int64)
    np.cumsum(counts, out=query_start_loc[1:])
    # positions: for each request, starts[i] .. starts[i] + counts[i] - 1
    positions = np.repeat(starts - query_start_loc[:-1], counts) + np.arange(query_start_loc[-1])
    input_ids = np.concatenate([states[s.request_id].token_ids(s.num_computed_tokens, s.num_scheduled_tokens)
                                for s in scheduled])
    to_device = _to_device(device)
    attention = attention_metadata(starts, counts, _block_tables([s.block_ids for s in scheduled]), block_size,
                                   to_device)
    logits_indices = [query_start_loc[i + 1] - 1 for i, s in enumerate(scheduled) if s.samples]
    elastic = None if elastic_levels is None else _elastic_rows(scheduled, counts, elastic_levels, to_device)
    return ForwardBatch(input_ids=to_device(input_ids), positions=to_device(positions), attention=attention,
                        request_ids=[s.request_id for s in scheduled],
                        logits_indices=to_device(np.array(logits_indices, dtype=np.int64)), elastic=elastic)


def attention_metadata(starts: np.ndarray, counts: np.ndarray, block_tables: np.ndarray, block_size: int,
                       to_device) -> AttentionMetadata:
    """Sequence i runs tokens [starts[i], starts[i] + counts[i]) over block_tables[i] (the ranges above)."""
    query_start_loc = np.zeros(len(starts) + 1, dtype=np.int64)
    np.cumsum(counts, out=query_start_loc[1:])
    positions = np.repeat(starts - query_start_loc[:-1], counts) + np.arange(query_start_loc[-1])
    row_of_token = np.repeat(np.arange(len(starts)), counts)
    slot_mapping = (block_tables[row_of_token, positions // block_size].astype(np.int64) * block_size
                    + positions % block_size)
    seq_lens = starts + counts
    return AttentionMetadata(
        slot_mapping=to_device(slot_mapping),
        query_start_loc=to_device(query_start_loc.astype(np.int32)),
        seq_lens=to_device(seq_lens.astype(np.int32)),
        block_tables=to_device(block_tables),
        num_decodes=int(np.searchsorted(counts != 1, True)),  # decodes come first
        max_query_len=int(counts.max()),
        max_seq_len=int(seq_lens.max()),
        block_size=block_size,
        query_start_loc_cpu=query_start_loc.tolist(),
        seq_lens_cpu=seq_lens.tolist(),
    )


def _elastic_rows(scheduled: list[ScheduledRequest], counts: np.ndarray, elastic_levels: Sequence[int],
                  to_device) -> ElasticRows | None:
    """Rows regrouped by level index (stable, so rows of one request stay in order); None when
    every row runs the full model, so that such steps take the plain path."""
    index_of = {level: index for index, level in enumerate(elastic_levels)}
    request_levels = np.array([index_of[s.elastic_level] for s in scheduled], dtype=np.int64)
    if not request_levels.any():
        return None
    row_levels = np.repeat(request_levels, counts)
    rows_upto = np.cumsum(np.bincount(row_levels, minlength=len(elastic_levels)))
    upto = tuple(rows_upto.tolist())
    if np.all(row_levels[:-1] <= row_levels[1:]):
        return ElasticRows(order=None, inverse=None, rows_upto=upto, row_levels=to_device(row_levels))
    order = np.argsort(row_levels, kind="stable")
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.shape[0])
    return ElasticRows(order=to_device(order), inverse=to_device(inverse), rows_upto=upto,
                       row_levels=to_device(row_levels))


def _block_tables(tables: list[list[int]]) -> np.ndarray:
    """[num_seqs, max_blocks] int32, padded with 0 (never read: seq_lens bound every read)."""
    max_blocks = max(len(block_ids) for block_ids in tables)
    block_tables = np.zeros((len(tables), max_blocks), dtype=np.int32)
    for i, block_ids in enumerate(tables):
        block_tables[i, : len(block_ids)] = block_ids
    return block_tables


def _to_device(device: torch.device):
    def convert(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device)
    return convert
