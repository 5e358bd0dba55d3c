"""Turns engine-side progress (new tokens) into user-facing RequestOutputs: incremental text,
stop strings, logprobs, and n > 1 samples gathered under their parent request."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput
from engine.request import Request
from engine.scheduler.output import PromptLogprobsLists, SampledToken
from engine.tokenizer.detokenizer import IncrementalDetokenizer
from engine.tokenizer.tokenizer import Tokenizer


@dataclass
class SampleState:
    """One of a parent's n samples, as the user sees it."""

    request: Request
    index: int
    detokenizer: IncrementalDetokenizer
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def completion(self) -> CompletionOutput:
        finished = self.finish_reason is not None
        return CompletionOutput(index=self.index, text=self.detokenizer.output_text(finished),
                                token_ids=list(self.request.output_token_ids),
                                cumulative_logprob=self.cumulative_logprob,
                                logprobs=list(self.logprobs) if self.logprobs is not None else None,
                                finish_reason=self.finish_reason, stop_reason=self.stop_reason)


@dataclass
class ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[SampleState] = field(default_factory=list)
    prompt_logprobs: PromptLogprobs | None = None  # from the first sample to score the prompt
    error: tuple[str, str] | None = None  # (reason, message) once processing it failed

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)

    def output(self) -> RequestOutput:
        first = self.samples[0].request.metrics
        return RequestOutput(request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_token_ids,
                             outputs=[s.completion() for s in self.samples], finished=self.finished,
                             metrics=first, sample_metrics=[s.request.metrics for s in self.samples],
                             elastic_level=self.samples[0].request.elastic_level,
                             prompt_keep=self.samples[0].request.prompt_keep,
                             elastic_auto=self.samples[0].request.elastic_auto,
                             prompt_logprobs=self.prompt_logprobs, error=self.error,
                             num_prompt_tokens_computed_in_full=self.samples[0].request.num_prompt_tokens_computed_in_full)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, ParentState] = {}
        self.samples: dict[str, tuple[ParentState, SampleState]] = {}  # child request id -> states

    def add(self, parent_id: str, prompt: str | None, children: list[Request]) -> None:
        parent = ParentState(parent_id, prompt, children[0].prompt_token_ids)
        for index, child in enumerate(children):
            params = child.sampling_params
            detokenizer = IncrementalDetokenizer(self.tokenizer, params.stop_strings, params.skip_special_tokens,
                                                 params.include_stop_str_in_output)
            wants_logprobs = params.logprobs is not None
            sample = SampleState(child, index, detokenizer, [] if wants_logprobs else None,
                                 0.0 if wants_logprobs else None)
            parent.samples.append(sample)
            self.samples[child.request_id] = (parent, sample)
        self.parents[parent_id] = parent

    def child_ids(self, parent_id: str) -> list[str]:
        parent = self.parents.get(parent_id)
        return [] if parent is None else [s.request.request_id for s in parent.samples]

    def on_token(self, request: Request, sampled: SampledToken) -> str | None:
        """Record a new token; returns the stop string if it completed one."""
        _, sample = self.samples[request.request_id]
        if sample.logprobs is not None and sampled.logprob is not None:
            sample.logprobs.append(self._logprobs(sampled))
            sample.cumulative_logprob += sampled.logprob
        return sample.detokenizer.add_token(sampled.token_id)

    def on_prompt_logprobs(self, request: Request, scored: PromptLogprobsLists) -> None:
        """Record how the model scored the prompt.  Each of n samples scores it (so whichever
        samples first brings it with its first token); the first kept stands for all."""
        parent, _ = self.samples[request.request_id]
        if parent.prompt_logprobs is not None:
            return
        prompt_logprobs: PromptLogprobs = [None]
        for token_id, logprob, rank, top_token_ids, top_logprobs in zip(
                parent.prompt_token_ids[1:], scored.logprobs, scored.ranks, scored.top_token_ids, scored.top_logprobs):
            prompt_logprobs.append(self._entry(token_id, logprob, rank, top_token_ids, top_logprobs))
        parent.prompt_logprobs = prompt_logprobs

    def _logprobs(self, sampled: SampledToken) -> dict[int, Logprob]:
        return self._entry(sampled.token_id, sampled.logprob, sampled.rank, sampled.top_token_ids,
                           sampled.top_logprobs)

    def _entry(self, token_id: int, logprob: float, rank: int, top_token_ids: list[int],
               top_logprobs: list[float]) -> dict[int, Logprob]:
        """A token's Logprob and its position's top alternatives, by token id."""
        entry = {token_id: Logprob(logprob, rank, self.tokenizer.token_text(token_id))}
        for top_rank, (top_id, top_logprob) in enumerate(zip(top_token_ids, top_logprobs), start=1):
            if top_id not in entry:
                entry[top_id] = Logprob(top_logprob, top_rank, self.tokenizer.token_text(top_id))
        return entry

    def fail(self, request_id: str, reason: str, message: str) -> list[Request]:
        """Mark the parent of this (child) request failed; returns all its samples' requests,
        which the caller ends."""
        parent, _ = self.samples[request_id]
        parent.error = (reason, message)
        return [sample.request for sample in parent.samples]

    def on_finished(self, request: Request) -> None:
        _, sample = self.samples[request.request_id]
        sample.finish_reason = request.finish_reason
        sample.stop_reason = request.stop_reason

    def outputs_for(self, requests: list[Request]) -> list[RequestOutput]:
        """One RequestOutput per parent touched by these requests; finished parents are dropped."""
        parents: dict[str, ParentState] = {}
        for request in requests:
            state = self.samples.get(request.request_id)
            if state is not None:
                parents[state[0].request_id] = state[0]
        outputs = [parent.output() for parent in parents.values()]
        for parent in parents.values():
            if parent.finished:
                self._drop(parent)
        return outputs

    def _drop(self, parent: ParentState) -> None:
        del self.parents[parent.request_id]
        for sample in parent.samples:
            del self.samples[sample.request.request_id]
