"""Turn the logits of the rows that sample this step into tokens (and logprobs).

Order of operations, per row: raw logprobs (what users get back, as vLLM returns by default) ->
logit_bias -> min_tokens masking of stop ids -> repetition / presence / frequency penalties ->
greedy argmax, or temperature -> top_k -> top_p -> min_p -> a draw.

A draw is argmax(probs / q) with q ~ Exp(1) (the exponential-race form of sampling from probs).
Seeded rows draw q from their own torch.Generator, so a seeded request's tokens depend only on
its seed and its own logits, never on what else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams
from engine.scheduler.output import SampledToken


@dataclass(slots=True)
class SamplingRow:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    stop_ids_for_min_tokens: frozenset[int]  # eos + stop_token_ids, masked until min_tokens
    generator: torch.Generator | None  # set for seeded rows


class Sampler:
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[SampledToken]:
        """logits [num_rows, vocab] float32 -> one SampledToken per row."""
        raw_logprobs = None
        if any(row.params.logprobs is not None for row in rows):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = self._adjust_logits(logits, rows)
        token_ids, finite = self._pick_tokens(logits, rows)
        sampled = [self._sampled(i, token_ids[i], raw_logprobs, row) for i, row in enumerate(rows)]
        for i in (i for i, ok in enumerate(finite) if not ok):
            sampled[i] = SampledToken(token_ids[i], logits_finite=False)
        return sampled

    def _adjust_logits(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        needs_copy = any(r.params.logit_bias or r.params.has_penalties or self._masks_stop_ids(r) for r in rows)
        if not needs_copy:
            return logits
        logits = logits.clone()
        vocab_size = logits.shape[1]
        for i, row in enumerate(rows):
            if row.params.logit_bias:
                ids = [t for t in row.params.logit_bias if 0 <= t < vocab_size]
                logits[i, ids] += torch.tensor([row.params.logit_bias[t] for t in ids], dtype=logits.dtype)
            if self._masks_stop_ids(row):
                logits[i, [t for t in row.stop_ids_for_min_tokens if 0 <= t < vocab_size]] = float("-inf")
            if row.params.has_penalties:
                apply_penalties(logits[i], row.params, row.prompt_token_ids, row.output_token_ids)
        return logits

    @staticmethod
    def _masks_stop_ids(row: SamplingRow) -> bool:
        return len(row.output_token_ids) < row.params.min_tokens and bool(row.stop_ids_for_min_tokens)

    def _pick_tokens(self, logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[list[int], list[bool]]:
        """Each row's token, and whether its logits were finite.  A NaN anywhere in a row makes
        its maximum NaN (max propagates NaN), +inf makes it inf, all -inf (every token masked)
        makes it -inf: so the row maxima tell, for free, which rows no token can be drawn for."""
        maxima, token_ids = row_maxima(logits)
        finite = torch.isfinite(maxima).tolist()
        random_rows = [i for i, row in enumerate(rows) if not row.params.is_greedy]
        if random_rows:
            index = torch.tensor(random_rows)
            probs = filtered_probs(logits[index], [rows[i].params for i in random_rows])
            token_ids[index] = self._draw(probs, [rows[i].generator for i in random_rows])
        return token_ids.tolist(), finite

    @staticmethod
    def _draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        q = torch.empty_like(probs)
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if unseeded:
            q[unseeded] = torch.empty(len(unseeded), probs.shape[1]).exponential_()
        for i, generator in enumerate(generators):
            if generator is not None:
                q[i].exponential_(generator=generator)
        return row_maxima(probs / q)[1]  # argmax

    @staticmethod
    def _sampled(i: int, token_id: int, raw_logprobs: torch.Tensor | None, row: SamplingRow) -> SampledToken:
        num_top = row.params.logprobs
        if raw_logprobs is None or num_top is None:
            return SampledToken(token_id)
        row_logprobs = raw_logprobs[i]
        token_logprob = row_logprobs[token_id]
        rank = int((row_logprobs > token_logprob).sum()) + 1
        top = torch.topk(row_logprobs, num_top) if num_top else None
        return SampledToken(
            token_id=token_id, logprob=float(token_logprob), rank=rank,
            top_token_ids=top.indices.tolist() if top is not None else [],
            top_logprobs=top.values.tolist() if top is not None else [],
        )


# Columns a row's maximum is first taken over (row_maxima).
_MAXIMA_CHUNK = 1024


def row_maxima(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's maximum and the index of its first maximum, as x.max(dim=-1) gives them (a NaN
    in a row makes its maximum NaN), from [rows, columns] x.

    PERF: torch's max along a row with its index runs one scalar loop a row: 32 rows x 49k
    columns (SmolLM2's vocabulary, fp32) took ~1.3 ms of every decode step on the 2-core EPYC,
    3-4% of a step.  amax (values only) is vectorized and threaded: the maximum of each 1,024
    columns, then the first chunk holding the row's maximum, then the first maximum inside it,
    take ~0.2 ms."""
    rows, columns = x.shape
    chunks = columns // _MAXIMA_CHUNK
    if chunks < 2 or rows == 0:
        return x.max(dim=-1)
    whole = chunks * _MAXIMA_CHUNK
    chunk_maxima = x[:, :whole].reshape(rows, chunks, _MAXIMA_CHUNK).amax(dim=-1)  # a view of contiguous rows
    if whole < columns:  # the last, shorter chunk
        chunk_maxima = torch.cat([chunk_maxima, x[:, whole:].amax(dim=-1, keepdim=True)], dim=1)
    best_chunk = chunk_maxima.argmax(dim=-1)  # the first chunk holding the maximum (or a NaN)
    maxima = chunk_maxima.gather(1, best_chunk[:, None]).squeeze(1)
    first_column = best_chunk * _MAXIMA_CHUNK
    # Past the last column the window repeats it, which cannot come before its first maximum.
    window = (first_column[:, None] + torch.arange(_MAXIMA_CHUNK)).clamp_(max=columns - 1)
    return maxima, first_column + x.gather(1, window).argmax(dim=-1)


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_token_ids: list[int],
                    output_token_ids: list[int]) -> None:
    """In place on one row, with vLLM's semantics: repetition penalty over prompt and output
    (divide positive logits, multiply negative ones), presence and frequency over the output."""
    vocab_size = logits.shape[0]
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(vocab_size, dtype=torch.bool)
        seen[torch.tensor(prompt_token_ids + output_token_ids, dtype=torch.long)] = True
        penalized = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        # Any positive penalty is valid (vLLM's rule), but a tiny one overflows a positive logit
        # to +inf, which the row's finite check would blame on the model (a fuzzer's 5.7e-121
        # ended its request with a 500): its limit is the largest finite logit instead.
        penalized.clamp_(max=torch.finfo(logits.dtype).max)
        logits.copy_(torch.where(seen, penalized, logits))
    if output_token_ids and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output_token_ids, dtype=torch.long), minlength=vocab_size)[:vocab_size]
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)


def filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top_k, top_p and min_p, each per row; returns probabilities."""
    temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype)[:, None]
    # Shifted by each row's maximum first (softmax and every filter below ignore a shift), so that
    # a logit near the largest finite value does not overflow when a temperature under 1 divides it.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if any(p.top_k or p.top_p < 1.0 for p in params):
        logits = _top_k_top_p(logits, params)
    probs = torch.softmax(logits, dim=-1)
    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=probs.dtype)[:, None]
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    return probs


def _top_k_top_p(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
    vocab_size = logits.shape[1]
    top_k = torch.tensor([p.top_k if p.top_k else vocab_size for p in params])[:, None]
    ranks = torch.arange(vocab_size)[None, :]
    remove = ranks >= top_k
    top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype)[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
    # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it does.
    mass_before = probs.cumsum(dim=-1) - probs
    remove |= mass_before >= top_p
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)
