"""Frozen configuration, one dataclass per concern.  No I/O happens here: values are checked in
`__post_init__`, and anything read from the model file (its context length) is resolved by the
engine and passed in through `dataclasses.replace`."""

from __future__ import annotations

from dataclasses import dataclass, field

DTYPES = ("auto", "bfloat16", "float32", "float16")
WEIGHT_FORMATS = ("auto", "dequantized", "native", "native_q8", "int8")
ATTENTION_BACKENDS = ("auto", "torch", "native", "triton")
KV_CACHE_DTYPES = ("auto", "int8")  # engine/kernels/kv_cache_format.py
SCHEDULING_POLICIES = ("fcfs", "priority", "mlfq", "slo")
ELASTIC_MODES = ("auto", "on", "off")
PROMPT_SCORINGS = ("attention", "random")


class ConfigError(ValueError):
    """A configuration value out of range; the message names the setting."""


class ModelFileError(ValueError):
    """A model that cannot be loaded from what is on disk: a path that does not exist, a file that
    is not a model or is cut short, an architecture, tokenizer or tensor type this engine does not
    run.  The message names the file (or, for a Hugging Face config, what in it is unsupported);
    `engine serve`, `engine generate` and `engine elastify` print it as one line."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = None  # GGUF file or Hugging Face directory; None = the default model
    # Activations, KV cache and dense weights.  auto: the fastest correct one for the device
    # (bf16 on CUDA and on CPUs with bf16 dot products, else fp32), logged with the reason.
    dtype: str = "auto"
    # How linear weights are held.  dequantized: floats in `dtype`; native: a GGUF file's own
    # Q4_0/Q4_1/Q8_0 blocks through the C++ quantized linear (fp32 arithmetic, exact); native_q8:
    # the same blocks, activations rounded to Q8 blocks and integer dot products (llama.cpp's
    # arithmetic: numbers a little off, see ComputePlan) in steps of more than 4 rows;
    # int8: float weights quantized to int8 blocks; auto: native where the C++ kernels run on
    # this CPU, else dequantized.
    weight_format: str = "auto"
    max_model_len: int | None = None  # None = the model's own context length
    served_model_name: str | None = None
    # Elastic submodels (engine/elastic/).  on: load the model's elastic checkpoint, building it
    # first if missing (minutes, cached); auto: on for the default model, off for others; off.
    elastic: str = "auto"
    elastic_checkpoint: str | None = None  # a checkpoint directory; None = the user cache's
    elastic_level: int = 100  # level for requests that name none (one of the checkpoint's levels)
    # Requests that name no level and no prompt_keep leave both to the SLO policy ("auto",
    # engine/scheduler/elastic_choice.py) instead of taking elastic_level and the default keep.
    elastic_auto: bool = False

    def __post_init__(self) -> None:
        _require(self.elastic in ELASTIC_MODES, f"elastic must be one of {ELASTIC_MODES}, got {self.elastic!r}")
        _require(0 < self.elastic_level <= 100, f"elastic_level must be in (0, 100], got {self.elastic_level}")
        _require(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        _require(self.weight_format in WEIGHT_FORMATS,
                 f"weight_format must be one of {WEIGHT_FORMATS}, got {self.weight_format!r}")
        _require(self.max_model_len is None or self.max_model_len >= 1,
                 f"max_model_len must be positive, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    kv_cache_memory: float = 2.0  # GiB for K and V of all layers; ignored if num_kv_blocks is set
    num_kv_blocks: int | None = None
    # Share the KV of identical prompt prefixes between requests (full blocks, LRU-evicted).
    enable_prefix_caching: bool = True
    # K and V as stored: "auto" in the model's dtype, "int8" one int8 per value plus an fp32 scale
    # per row (engine/kernels/kv_cache_format.py): ~1.9x the blocks in the same
    # memory, decode attention reading half the bytes.
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        _require(self.block_size >= 1 and self.block_size & (self.block_size - 1) == 0,
                 f"block_size must be a power of two, got {self.block_size}")
        _require(self.kv_cache_dtype in KV_CACHE_DTYPES,
                 f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        _require(self.kv_cache_memory > 0, f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        _require(self.num_kv_blocks is None or self.num_kv_blocks >= 1,
                 f"num_kv_blocks must be positive, got {self.num_kv_blocks}")


@dataclass(frozen=True)
class MLFQConfig:
    """FastServe's skip-join multi-level feedback queue.  Service is counted in quanta units: one
    decode step of a request is one unit; prefill counts prefill_tokens_per_unit tokens a unit."""

    num_levels: int = 8  # queue i has quantum base_quantum * 2**i units; the last is unbounded
    base_quantum: int = 1
    # Prefill tokens that cost about one decode step of the batch on this CPU (a 512-token chunk
    # costs a few decode steps): a prompt of L tokens joins the highest queue whose quantum covers
    # ceil(L / prefill_tokens_per_unit).
    prefill_tokens_per_unit: int = 128
    starvation_s: float = 20.0  # unscheduled this long -> promoted back to the top queue

    def __post_init__(self) -> None:
        _require(self.num_levels >= 1, f"mlfq num_levels must be positive, got {self.num_levels}")
        _require(self.base_quantum >= 1, f"mlfq base_quantum must be positive, got {self.base_quantum}")
        _require(self.prefill_tokens_per_unit >= 1,
                 f"mlfq prefill_tokens_per_unit must be positive, got {self.prefill_tokens_per_unit}")
        _require(self.starvation_s > 0, f"mlfq starvation_s must be positive, got {self.starvation_s}")


@dataclass(frozen=True)
class SLOConfig:
    """Server-wide latency targets for requests that bring none (None = no target)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    best_effort: bool = False  # serve requests whose TTFT target is out of reach instead of refusing them

    def __post_init__(self) -> None:
        _require(self.ttft_ms is None or self.ttft_ms > 0, f"slo ttft_ms must be positive, got {self.ttft_ms}")
        _require(self.tpot_ms is None or self.tpot_ms > 0, f"slo tpot_ms must be positive, got {self.tpot_ms}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 512  # token budget of one step (decodes + prefill chunks)
    max_num_seqs: int = 128  # requests in one step at most
    policy: str = "fcfs"
    max_model_len: int = 8192  # resolved from the model by the engine
    mlfq: MLFQConfig = field(default_factory=MLFQConfig)
    slo: SLOConfig = field(default_factory=SLOConfig)

    def __post_init__(self) -> None:
        _require(self.max_num_batched_tokens >= 1,
                 f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        _require(self.max_num_seqs >= 1, f"max_num_seqs must be positive, got {self.max_num_seqs}")
        _require(self.policy in SCHEDULING_POLICIES,
                 f"scheduling policy must be one of {SCHEDULING_POLICIES}, got {self.policy!r}")


@dataclass(frozen=True)
class RunnerConfig:
    device: str = "cpu"
    attention_backend: str = "auto"  # auto: triton on CUDA, native (C++ decode, else torch) on CPU
    num_threads: int | None = None  # torch intra-op threads; None = torch's default

    def __post_init__(self) -> None:
        _require(self.attention_backend in ATTENTION_BACKENDS,
                 f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")


@dataclass(frozen=True)
class ParallelConfig:
    # Ranks that each hold a shard of every weight and of the KV heads (engine/model/sharding.py),
    # one process each (engine/worker/tensor_parallel.py); 1: the model runs in the engine's process.
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        _require(self.tensor_parallel_size >= 1,
                 f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}")


@dataclass(frozen=True)
class PromptPruningConfig:
    """Per-request prompt pruning (engine/prompt_pruning.py): every prompt token runs the layers
    below the first prune layer; past each prune layer, only what that stage kept.  Which are kept
    is scored by the model's own attention (engine/model/layers/prompt_pruning.py)."""

    # One KV group per stage plus the shallow one.  Off: one group, as without this feature, and
    # a request asking for prompt_keep < 1 is refused.
    enabled: bool = True
    # l_1 < ... < l_S: the layers where each stage cuts the prompt (engine/prompt_pruning.py); one
    # layer is one-stage pruning.  None = the engine's measured default for the model's depth
    # (DEFAULT_PRUNE_LAYER_FRACTIONS of its layers).
    prune_layers: tuple[int, ...] | None = None
    default_keep: float = 1.0  # prompt_keep of requests that name none (--prompt-keep)
    min_prompt_tokens: int = 512  # shorter prompts are never pruned
    num_sink_tokens: int = 4  # the first tokens, always kept (attention sinks)
    window: int = 32  # the last prompt tokens, always kept
    # The last prompt tokens whose queries score the rest (<= window).  Measured: with ShareGPT
    # filler the last 8 queries are the question's; 32 reach back into the filler and blur the
    # score (needle recall at layer 9, keep 0.5: 0.83 with 8, 0.70 with 32).
    score_window: int = 8
    num_score_layers: int = 3  # the layers [l - n, l) before each prune layer l whose attention scores
    pool_size: int = 9  # scores are max-pooled over this many neighbours (odd): spans survive whole
    scoring: str = "attention"  # or "random": the same mechanism with seeded random scores

    def __post_init__(self) -> None:
        _require(self.prune_layers is None or (len(self.prune_layers) >= 1 and self.prune_layers[0] >= 1 and all(
                 a < b for a, b in zip(self.prune_layers, self.prune_layers[1:]))),
                 f"prompt pruning prune_layers must ascend from at least 1, got {self.prune_layers}")
        _require(0 < self.default_keep <= 1, f"prompt_keep must be in (0, 1], got {self.default_keep}")
        _require(self.num_sink_tokens >= 0, f"num_sink_tokens must be non-negative, got {self.num_sink_tokens}")
        _require(self.window >= 1, f"prompt pruning window must be positive, got {self.window}")
        _require(1 <= self.score_window <= self.window,
                 f"prompt pruning score_window must be in [1, window], got {self.score_window}")
        _require(self.min_prompt_tokens >= self.num_sink_tokens + self.window,
                 f"min_prompt_tokens must cover the sinks and the window, got {self.min_prompt_tokens}")
        _require(self.num_score_layers >= 1, f"num_score_layers must be positive, got {self.num_score_layers}")
        _require(self.pool_size >= 1 and self.pool_size % 2 == 1, f"pool_size must be odd, got {self.pool_size}")
        _require(self.scoring in PROMPT_SCORINGS,
                 f"prompt scoring must be one of {PROMPT_SCORINGS}, got {self.scoring!r}")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    prompt_pruning: PromptPruningConfig = field(default_factory=PromptPruningConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

