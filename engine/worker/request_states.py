"""The runner's own copy of each running request: its tokens and what sampling needs.

Built from NewRequestData when a request starts (or restarts) running; the runner appends every
token it samples, so `token_ids` always equals the scheduler's `all_token_ids` for that request at
the start of a step.  Dropped when the scheduler reports the request finished or preempted, except
a seeded request's generator, which lives until the request finishes: a preempted request resumes
its draws where they were, so its tokens do not depend on whether it was preempted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.prompt_pruning import PrunePlan
from engine.sampling_params import SamplingParams
from engine.scheduler.output import NewRequestData, PromptLogprobsLists, SchedulerOutput
from engine.worker.prompt_logprobs import PromptLogprobsBuffer
from engine.worker.sampler import SamplingRow


@dataclass(slots=True)
class RequestState:
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    stop_ids_for_min_tokens: frozenset[int]  # eos + stop_token_ids, masked until min_tokens
    generator: torch.Generator | None  # seeded requests draw from their own generator
    # Set while the prompt is being scored (NewRequestData.needs_prompt_logprobs); taken, and so
    # dropped, in the step that samples the first token.
    prompt_logprobs: PromptLogprobsBuffer | None = None
    prune_plan: PrunePlan | None = None
    # Per stage, once chosen (or given on a restart).
    kept_prompt_positions: tuple[tuple[int, ...], ...] | None = None

    @classmethod
    def of(cls, data: NewRequestData, generator: torch.Generator | None) -> RequestState:
        params = data.sampling_params
        stop_ids = (frozenset() if params.ignore_eos else data.eos_token_ids) | frozenset(params.stop_token_ids or ())
        prompt_logprobs = None
        if data.needs_prompt_logprobs and params.prompt_logprobs is not None:
            prompt_logprobs = PromptLogprobsBuffer.empty(len(data.prompt_token_ids), params.prompt_logprobs)
        return cls(list(data.prompt_token_ids), list(data.output_token_ids), params, stop_ids, generator,
                   prompt_logprobs, data.prune_plan, data.kept_prompt_positions)

    def token_ids(self, start: int, count: int) -> list[int]:
        """Tokens [start, start + count) of prompt + output."""
        num_prompt = len(self.prompt_token_ids)
        if start + count <= num_prompt:
            return self.prompt_token_ids[start: start + count]
        return (self.prompt_token_ids + self.output_token_ids)[start: start + count]


class RequestStates:
    def __init__(self) -> None:
        self._states: dict[str, RequestState] = {}
        self._generators: dict[str, torch.Generator] = {}

    def update(self, output: SchedulerOutput) -> None:
        """Drop what ended or was preempted, take in what starts."""
        for request_id in output.finished_request_ids:
            self._generators.pop(request_id, None)
        for request_id in output.finished_request_ids | output.preempted_request_ids:
            self._states.pop(request_id, None)
        for item in output.scheduled:
            if item.new_request is not None:
                self._states[item.request_id] = RequestState.of(item.new_request, self._generator(item.new_request))

    def _generator(self, data: NewRequestData) -> torch.Generator | None:
        seed = data.sampling_params.seed
        if seed is None:
            return None
        if data.request_id not in self._generators:
            self._generators[data.request_id] = torch.Generator().manual_seed(seed)
        return self._generators[data.request_id]

    def __getitem__(self, request_id: str) -> RequestState:
        return self._states[request_id]

    def __len__(self) -> int:
        return len(self._states)

    def sampling_row(self, request_id: str) -> SamplingRow:
        state = self._states[request_id]
        return SamplingRow(params=state.sampling_params, prompt_token_ids=state.prompt_token_ids,
                           output_token_ids=state.output_token_ids,
                           stop_ids_for_min_tokens=state.stop_ids_for_min_tokens, generator=state.generator)

    def take_prompt_logprobs(self, request_ids: list[str]) -> dict[str, PromptLogprobsLists]:
        """The scored prompts of these requests (those that sample this step), each handed out once."""
        taken = {}
        for request_id in request_ids:
            state = self._states[request_id]
            if state.prompt_logprobs is not None:
                taken[request_id] = state.prompt_logprobs.to_lists()
                state.prompt_logprobs = None
        return taken

    def append_sampled(self, request_ids: list[str], token_ids: list[int]) -> None:
        for request_id, token_id in zip(request_ids, token_ids):
            self._states[request_id].output_token_ids.append(token_id)
