"""The model runner: owns the weights and the KV tensors, runs one forward per step over the
flattened batch, and samples.  It computes and never decides: what to run comes in a
SchedulerOutput, what came out goes back in a ModelRunnerOutput."""

from __future__ import annotations

import numpy as np
import torch

from engine.config import CacheConfig, RunnerConfig
from engine.kernels.cpu import native_library
from engine.model.llama import LlamaForCausalLM
from engine.model.loader import ModelSource, load_model
from engine.scheduler.output import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from engine.worker.attention import AttentionBackend, AttentionMetadata, TorchAttentionBackend
from engine.worker.host_allocator import keep_freed_memory
from engine.worker.prepacked_linear import can_prepack, prepack_linears
from engine.worker.sampler import Sampler, SamplingRow

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
GiB = 1 << 30


def make_attention_backend(name: str, device: str) -> AttentionBackend:
    """auto: the Triton kernels on CUDA, the C++ decode kernel on CPU where it builds (else the
    torch path); triton on CPU runs the Triton interpreter (set TRITON_INTERPRET=1), for tests."""
    if name == "triton" or (name == "auto" and device.startswith("cuda")):
        from engine.kernels.triton_backend import TritonAttentionBackend
        return TritonAttentionBackend()
    if name == "native" or (name == "auto" and device == "cpu"):
        from engine.kernels.cpu.native_backend import NativeCpuAttentionBackend
        if name == "native" and native_library.load() is None:
            raise RuntimeError("attention_backend='native' needs the C++ CPU kernels, which could not be "
                               "built or loaded here (see the log); use 'auto' or 'torch'")
        return NativeCpuAttentionBackend()
    return TorchAttentionBackend()


def num_kv_blocks_for(source: ModelSource, cache: CacheConfig, dtype: torch.dtype) -> int:
    if cache.num_kv_blocks is not None:
        return cache.num_kv_blocks
    element_size = torch.empty((), dtype=dtype).element_size()
    bytes_per_block = source.arch.kv_bytes_per_token * cache.block_size * element_size
    return max(1, int(cache.kv_cache_memory * GiB) // bytes_per_block)


class ModelRunner:
    def __init__(self, source: ModelSource, dtype: str, cache: CacheConfig, runner: RunnerConfig) -> None:
        if runner.num_threads:
            torch.set_num_threads(runner.num_threads)
        self.device = torch.device(runner.device)
        if self.device.type == "cpu":
            keep_freed_memory()
            native_library.load()  # a machine's first run builds the C++ kernels here, not in a request's step
        self.dtype = TORCH_DTYPES[dtype]
        self.block_size = cache.block_size
        self.model: LlamaForCausalLM = load_model(source, self.dtype,
                                                  make_attention_backend(runner.attention_backend, runner.device),
                                                  runner.device)
        if can_prepack(self.device, self.dtype):
            prepack_linears(self.model)
        self.num_kv_blocks = num_kv_blocks_for(source, cache, self.dtype)
        arch = source.arch
        # [2, num_blocks, block_size, num_kv_heads, head_dim] per layer; zeros so masked-out
        # padding slots read finite values.
        self.kv_caches = [torch.zeros(2, self.num_kv_blocks, self.block_size, arch.num_kv_heads, arch.head_dim,
                                      dtype=self.dtype, device=self.device) for _ in range(arch.num_layers)]
        self.sampler = Sampler()
        self._generators: dict[str, torch.Generator] = {}

    @property
    def weights_bytes(self) -> int:
        tensors = [*self.model.parameters(), *self.model.buffers()]
        # Prepacked oneDNN weights are opaque (no data pointer): count them by identity.
        unique = {(t.data_ptr() if t.layout == torch.strided else id(t)): t.numel() * t.element_size()
                  for t in tensors}
        return sum(unique.values())

    @property
    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv_caches)

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        for request_id in scheduler_output.finished_request_ids:
            self._generators.pop(request_id, None)
        scheduled = scheduler_output.scheduled
        if not scheduled:
            return ModelRunnerOutput(sampled={})
        input_ids, positions, meta = self._prepare_inputs(scheduled)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        sampling = [i for i, s in enumerate(scheduled) if s.samples]
        if not sampling:
            return ModelRunnerOutput(sampled={})
        last_rows = torch.tensor([meta.query_start_loc_cpu[i + 1] - 1 for i in sampling], device=self.device)
        logits = self.model.compute_logits(hidden[last_rows])  # the LM head runs only for these rows
        rows = [self._sampling_row(scheduled[i]) for i in sampling]
        tokens = self.sampler(logits.cpu(), rows)
        return ModelRunnerOutput(sampled={scheduled[i].request.request_id: t for i, t in zip(sampling, tokens)})

    def _prepare_inputs(self, scheduled: list[ScheduledRequest]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        starts = np.array([s.num_computed_tokens for s in scheduled], dtype=np.int64)
        counts = np.array([s.num_scheduled_tokens for s in scheduled], dtype=np.int64)
        query_start_loc = np.zeros(len(scheduled) + 1, dtype=np.int64)
        np.cumsum(counts, out=query_start_loc[1:])
        # positions: for each request, starts[i] .. starts[i] + counts[i] - 1
        positions = np.repeat(starts - query_start_loc[:-1], counts) + np.arange(query_start_loc[-1])
        input_ids = np.concatenate([s.request.all_token_ids[c: c + n] for s, c, n in
                                    zip(scheduled, starts.tolist(), counts.tolist())])
        max_blocks = max(len(s.block_ids) for s in scheduled)
        block_tables = np.zeros((len(scheduled), max_blocks), dtype=np.int32)
        for i, s in enumerate(scheduled):
            block_tables[i, : len(s.block_ids)] = s.block_ids
        row_of_token = np.repeat(np.arange(len(scheduled)), counts)
        slot_mapping = (block_tables[row_of_token, positions // self.block_size].astype(np.int64) * self.block_size
                        + positions % self.block_size)
        seq_lens = starts + counts
        num_decodes = int(np.searchsorted(counts != 1, True))  # decodes come first
        meta = AttentionMetadata(
            slot_mapping=self._to_device(slot_mapping),
            query_start_loc=self._to_device(query_start_loc.astype(np.int32)),
            seq_lens=self._to_device(seq_lens.astype(np.int32)),
            block_tables=self._to_device(block_tables),
            num_decodes=num_decodes,
            max_query_len=int(counts.max()),
            max_seq_len=int(seq_lens.max()),
            block_size=self.block_size,
            query_start_loc_cpu=query_start_loc.tolist(),
            seq_lens_cpu=seq_lens.tolist(),
        )
        return self._to_device(input_ids), self._to_device(positions), meta

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def _sampling_row(self, item: ScheduledRequest) -> SamplingRow:
        request = item.request
        params = request.sampling_params
        return SamplingRow(
            params=params,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
            stop_ids_for_min_tokens=(frozenset() if params.ignore_eos else request.eos_token_ids)
            | frozenset(params.stop_token_ids or ()),
            generator=self._generator(request.request_id, params.seed),
        )

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        generator = self._generators.get(request_id)
        if generator is None:
            generator = torch.Generator().manual_seed(seed)
            self._generators[request_id] = generator
        return generator
