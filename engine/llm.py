"""The offline API, shaped like vLLM's: `LLM(...).generate(prompts, sampling_params)`."""

from __future__ import annotations

from collections.abc import Sequence

from tqdm import tqdm

from engine.config import (CacheConfig, EngineConfig, MLFQConfig, ModelConfig, ParallelConfig, PromptPruningConfig,
                           RunnerConfig, SchedulerConfig, SLOConfig)
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.tokenizer.tokenizer import Tokenizer

PromptInput = str | dict  # a string, or {"prompt_token_ids": [...]} / {"prompt": "..."}


class LLM:
    def __init__(self, model: str | None = None, *, dtype: str = "auto", weight_format: str = "auto", max_model_len: int | None = None,
                 max_num_batched_tokens: int = 512, max_num_seqs: int = 128, block_size: int = 16,
                 kv_cache_memory: float = 2.0, num_kv_blocks: int | None = None, kv_cache_dtype: str = "auto",
                 scheduling_policy: str = "fcfs",
                 enable_prefix_caching: bool = True, mlfq: MLFQConfig | None = None, slo: SLOConfig | None = None,
                 attention_backend: str = "auto", device: str = "cpu", elastic: str = "auto",
                 elastic_checkpoint: str | None = None, elastic_level: int = 100, elastic_auto: bool = False,
                 prompt_pruning: PromptPruningConfig | None = None, tensor_parallel_size: int = 1) -> None:
        """`tensor_parallel_size`: ranks (processes) that each hold a shard of the model; call
        `shutdown()` to stop them before making another such LLM in this process."""
        config = EngineConfig(
            model=ModelConfig(model=model, dtype=dtype, weight_format=weight_format, max_model_len=max_model_len,
                              elastic=elastic, elastic_checkpoint=elastic_checkpoint, elastic_level=elastic_level,
                              elastic_auto=elastic_auto),
            cache=CacheConfig(block_size=block_size, kv_cache_memory=kv_cache_memory, num_kv_blocks=num_kv_blocks,
                              enable_prefix_caching=enable_prefix_caching, kv_cache_dtype=kv_cache_dtype),
            scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                                      policy=scheduling_policy, mlfq=mlfq or MLFQConfig(), slo=slo or SLOConfig()),
            runner=RunnerConfig(device=device, attention_backend=attention_backend),
            prompt_pruning=prompt_pruning or PromptPruningConfig(),
            parallel=ParallelConfig(tensor_parallel_size=tensor_parallel_size),
        )
        self.engine = LLMEngine(config)
        self._next_id = 0

    def shutdown(self) -> None:
        self.engine.shutdown()

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def memory_report(self) -> dict[str, int]:
        return self.engine.memory_report()

    def generate(self, prompts: PromptInput | Sequence[PromptInput],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None,
                 elastic_level: int | Sequence[int | None] | None = None,
                 prompt_keep: float | Sequence[float | None] | None = None,
                 prompt_scoring: str | Sequence[str | None] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of the prompts.
        `priority` (one per prompt, lower first) matters under the priority policy, as in vLLM.
        `elastic_level`: the submodel for every prompt, or one per prompt (None: the default).
        `prompt_keep`: the fraction of each long prompt the layers past the prune layer compute,
        for every prompt or one per prompt (None: the default); `prompt_scoring` picks the tokens
        ("attention", or "random" for the baseline)."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = self._params_per_prompt(len(prompts), sampling_params)
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"got {len(priority)} priorities for {len(prompts)} prompts")
        priorities = priority if priority is not None else [0] * len(prompts)
        levels = self._per_prompt(elastic_level, len(prompts), "elastic levels")
        keeps = self._per_prompt(prompt_keep, len(prompts), "prompt_keep values")
        scorings = self._per_prompt(prompt_scoring, len(prompts), "prompt scorings")
        request_ids = [self._add(prompt, p, rank, level, keep, scoring)
                       for prompt, p, rank, level, keep, scoring in zip(prompts, params, priorities, levels, keeps,
                                                                        scorings)]
        return self._run(request_ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """One conversation (a list of messages) or several; the chat template renders each."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.engine.tokenizer
        prompts = [{"prompt_token_ids": tokenizer.encode(
            tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt),
            add_special_tokens=False)} for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    @staticmethod
    def _per_prompt(value, num_prompts: int, what: str) -> list:
        if value is None or isinstance(value, int | float | str):
            return [value] * num_prompts
        if len(value) != num_prompts:
            raise ValueError(f"got {len(value)} {what} for {num_prompts} prompts")
        return list(value)

    @staticmethod
    def _params_per_prompt(num_prompts: int, sampling_params) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * num_prompts
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * num_prompts
        if len(sampling_params) != num_prompts:
            raise ValueError(f"got {len(sampling_params)} sampling params for {num_prompts} prompts")
        return list(sampling_params)

    def _add(self, prompt: PromptInput, params: SamplingParams, priority: int = 0,
             elastic_level: int | None = None, prompt_keep: float | None = None,
             prompt_scoring: str | None = None) -> str:
        request_id = str(self._next_id)
        self._next_id += 1
        if isinstance(prompt, dict):
            prompt = prompt["prompt_token_ids"] if "prompt_token_ids" in prompt else prompt["prompt"]
        self.engine.add_request(request_id, prompt, params, priority=priority, elastic_level=elastic_level,
                                prompt_keep=prompt_keep, prompt_scoring=prompt_scoring)
        return request_id

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        return [finished[request_id] for request_id in request_ids]
