"""The model runner: owns the weights and the KV tensors, runs one forward per step over the
flattened batch, and samples.  It computes and never decides: what to run comes in a
SchedulerOutput (plain data, see engine/scheduler/output.py), what came out goes back in a
ModelRunnerOutput."""

from __future__ import annotations

import logging

import torch

from engine.capabilities import log_capabilities
from engine.config import CacheConfig, ConfigError, PromptPruningConfig, RunnerConfig
from engine.distributed.group import TensorParallelGroup
from engine.elastic.checkpoint import ElasticCheckpoint
from engine.elastic.runtime import elastic_model_parts
from engine.model.attention_backends import make_attention_backend
from engine.kernels.kv_cache_format import bytes_per_row, row_size, storage_dtype
from engine.model.compute_plan import make_compute_plan
from engine.model.forward_batch import ForwardBatch
from engine.model.layers.linear import weight_bytes
from engine.model.layers.prompt_pruning import PromptPruner
from engine.model.llama import LlamaForCausalLM
from engine.model.loader import ModelSource, load_model
from engine.model.sharding import TensorParallelShard
from engine.prompt_pruning import default_prune_layers
from engine.scheduler.cost_model import OneCallSteps
from engine.scheduler.output import ModelRunnerOutput, SampledToken, ScheduledRequest, SchedulerOutput
from engine.worker.forward_batch_builder import build_forward_batch
from engine.worker.host_allocator import keep_freed_memory
from engine.worker.kept_rows_builder import build_kept_rows
from engine.worker.prompt_logprobs import score_prompt_chunk
from engine.worker.request_states import RequestStates
from engine.worker.sampler import Sampler

logger = logging.getLogger(__name__)
GiB = 1 << 30


def num_kv_blocks_for(source: ModelSource, cache: CacheConfig, dtype: torch.dtype,
                      with_hidden_cache: bool = False) -> int:
    """Blocks that fit kv_cache_memory; with prompt pruning each slot also holds one hidden row
    (the hidden cache), so the budget covers both."""
    if cache.num_kv_blocks is not None:
        return cache.num_kv_blocks
    arch = source.arch
    kv_bytes = 2 * arch.num_layers * arch.num_kv_heads * bytes_per_row(arch.head_dim, dtype, cache.kv_cache_dtype)
    hidden_bytes = arch.hidden_size * dtype.itemsize if with_hidden_cache else 0
    bytes_per_block = (kv_bytes + hidden_bytes) * cache.block_size
    return max(1, int(cache.kv_cache_memory * GiB) // bytes_per_block)


class ModelRunner:
    def __init__(self, source: ModelSource, dtype: str, cache: CacheConfig, runner: RunnerConfig,
                 weight_format: str = "auto", elastic: ElasticCheckpoint | None = None,
                 pruning: PromptPruningConfig | None = None, tp: TensorParallelGroup | None = None) -> None:
        """`elastic`: run the model as elastic submodels (its weights reordered by the checkpoint).
        `pruning`: cut the model at its prune layers into KV groups (None or disabled: one group).
        `tp`: this process is one rank of a tensor-parallel group: it holds its shard of the
        weights and of the KV heads, and only the driver (rank 0) samples."""
        self.tp = tp
        if runner.num_threads:
            torch.set_num_threads(runner.num_threads)
        self.device = torch.device(runner.device)
        if self.device.type == "cpu":
            log_capabilities()
            keep_freed_memory()
        # A machine's first run builds the C++ kernels here, not in a request's step.
        self.plan = make_compute_plan(dtype, weight_format, runner.device)
        self.dtype = self.plan.dtype
        self.block_size = cache.block_size
        backend = make_attention_backend(runner.attention_backend, runner.device)
        self.elastic_spec = None if elastic is None else elastic.spec
        self._prefill_attends_level_heads = backend.prefill_attends_level_heads
        # The model's level values, index 0 the full model (None: not elastic).
        self.elastic_levels = None if elastic is None else elastic.spec.level_values
        self.pruner = _make_pruner(pruning, source.arch.num_layers, tp)
        if elastic is None:
            self.model: LlamaForCausalLM = load_model(source, self.plan, backend, pruner=self.pruner, tp=tp)
        else:
            shard = None if tp is None else TensorParallelShard.for_rank(source.arch, tp.rank, tp.size)
            layers, reorder = elastic_model_parts(elastic, source.arch, self.plan, shard)
            self.model = load_model(source, self.plan, backend, layers, reorder, self.pruner, tp)
        # From the whole model's KV size: every rank has as many blocks, each its own KV heads' part.
        self.num_kv_blocks = num_kv_blocks_for(source, cache, self.dtype, with_hidden_cache=self.pruner is not None)
        arch = self.model.config  # a tensor-parallel rank's own heads
        # [2, num_blocks, block_size, num_kv_heads, row] per layer (kv_cache_format.py); zeros so
        # masked-out padding slots read finite values.
        self.kv_caches = [torch.zeros(2, self.num_kv_blocks, self.block_size, arch.num_kv_heads,
                                      row_size(arch.head_dim, cache.kv_cache_dtype),
                                      dtype=storage_dtype(self.dtype, cache.kv_cache_dtype), device=self.device)
                          for _ in range(arch.num_layers)]
        # Group A's residual stream entering the prune layer, one row per slot: what a kept token
        # resumes from in its stage-B step, whether its chunk ran this step, earlier, or in
        # another request that shared the block (engine/model/layers/prompt_pruning.py).
        self.hidden_cache = None if self.pruner is None else torch.zeros(
            self.num_kv_blocks * self.block_size, arch.hidden_size, dtype=self.dtype, device=self.device)
        self.sampler = Sampler()
        self.requests = RequestStates()
        logger.info("weights resident: %.1f MiB (%s)", self.weights_bytes / (1 << 20), self.plan.weight_format)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def weights_bytes(self) -> int:
        return weight_bytes(self.model)

    @property
    def prune_layers(self) -> tuple[int, ...]:
        """The first layer of each deep KV group; () when the model runs as one group."""
        return () if self.pruner is None else self.pruner.prune_layers

    @property
    def prefill_attention_fractions(self) -> dict[int, float]:
        """Per elastic level: the share of the full model's prefill attention it computes (its
        query heads, where the backend attends with a chunk's level's heads only); {} where every
        level computes all of it (engine/scheduler/knob_costs.py)."""
        if self.elastic_spec is None or not self._prefill_attends_level_heads:
            return {}
        return {level: self.elastic_spec.head_fraction(level) for level in self.elastic_levels}

    @property
    def one_call_steps(self) -> OneCallSteps | None:
        """Which steps with prefill chunks run each layer as one call (the step cost model's
        per_prefill_step_s skips them); None where no layer has that path."""
        return next((layer.fused_decode.limits for layer in self.model.layers if layer.fused_decode is not None), None)

    @property
    def kv_cache_bytes(self) -> int:
        hidden = 0 if self.hidden_cache is None else self.hidden_cache.numel() * self.hidden_cache.element_size()
        return sum(t.numel() * t.element_size() for t in self.kv_caches) + hidden

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self.requests.update(scheduler_output)
        scheduled = scheduler_output.scheduled
        if not scheduled:
            return ModelRunnerOutput(sampled={})
        batch = build_forward_batch(scheduled, self.requests, self.block_size, self.device, self.elastic_levels)
        if self.pruner is not None:
            batch.kept = build_kept_rows(scheduled, self.requests, batch, self.block_size, self.device,
                                         self.elastic_levels)
        hidden = self.model(batch, self.kv_caches, self.hidden_cache)
        kept_positions = self._chosen_kept_positions(batch)
        self._score_prompts(scheduled, hidden, batch)
        sampling = [s.request_id for s in scheduled if s.samples]
        if not sampling:
            return ModelRunnerOutput(sampled={}, kept_prompt_positions=kept_positions)
        logits = self.model.compute_logits(hidden[batch.logits_indices])  # the LM head runs only for these rows
        tokens = self._sample(logits, sampling)
        prompt_logprobs = self.requests.take_prompt_logprobs(sampling)
        self.requests.append_sampled(sampling, [t.token_id for t in tokens])
        return ModelRunnerOutput(sampled=dict(zip(sampling, tokens)), prompt_logprobs=prompt_logprobs,
                                 kept_prompt_positions=kept_positions)

    def _sample(self, logits: torch.Tensor, sampling: list[str]) -> list[SampledToken]:
        """The driver samples; under tensor parallelism the other ranks take its token ids (what
        their request states need for the next step) rather than drawing their own."""
        if self.tp is None:
            return self.sampler(logits.cpu(), [self.requests.sampling_row(r) for r in sampling])
        token_ids = torch.empty(len(sampling), dtype=torch.int64)
        tokens = []
        if self.tp.is_driver:
            tokens = self.sampler(logits.cpu(), [self.requests.sampling_row(r) for r in sampling])
            token_ids.copy_(torch.tensor([t.token_id for t in tokens], dtype=torch.int64))
        self.tp.broadcast_(token_ids)
        return tokens or [SampledToken(token_id) for token_id in token_ids.tolist()]

    def _score_prompts(self, scheduled: list[ScheduledRequest], hidden: torch.Tensor, batch: ForwardBatch) -> None:
        """Prompt logprobs of this step's prompt rows, for the requests that want them.  Such a
        request is never pruned, so all its rows reach the last layer; `batch` is in the last
        layer's row layout (group B's, where a prune layer ran)."""
        wanting = [item for item in scheduled if self.requests[item.request_id].prompt_logprobs is not None]
        if not wanting:  # also every step whose rows all stopped at the prune layer (attention None)
            return
        first_row = dict(zip(batch.request_ids, batch.attention.query_start_loc_cpu))
        for item in wanting:
            state = self.requests[item.request_id]
            score_prompt_chunk(self.model.compute_logits, hidden, item, first_row[item.request_id],
                               state.prompt_token_ids, state.prompt_logprobs)

    def _chosen_kept_positions(self, batch) -> dict[str, tuple[tuple[int, ...], ...]]:
        """The prompt positions chosen this step at each prune layer, for the scheduler to replay
        after a preemption."""
        chosen: dict[str, list[tuple[int, ...]]] = {}
        for kept in batch.kept or ():
            for selection in kept.selections:
                if not selection.is_replayed:
                    chosen.setdefault(selection.request_id, []).append(tuple(selection.kept_positions.tolist()))
        for request_id, stages in chosen.items():
            self.requests[request_id].kept_prompt_positions = tuple(stages)
        return {request_id: tuple(stages) for request_id, stages in chosen.items()}


def _make_pruner(config: PromptPruningConfig | None, num_layers: int,
                 tp: TensorParallelGroup | None = None) -> PromptPruner | None:
    if config is None or not config.enabled or num_layers < 2:
        return None
    prune_layers = config.prune_layers if config.prune_layers is not None else default_prune_layers(num_layers)
    if not all(1 <= layer < num_layers for layer in prune_layers):
        raise ConfigError(f"prune_layers must be in [1, {num_layers}), got {list(prune_layers)}")
    return PromptPruner(prune_layers, config.num_score_layers, config.num_sink_tokens, config.pool_size, tp)
