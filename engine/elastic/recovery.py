"""Closed-form recovery of each level: a per-layer bias and a rank-r linear correction per block,
fitted on calibration activations, no gradient steps.

For a block (attention or FFN) of a non-anchor layer at level L, with x the block's input after
its RMSNorm [N, H] (N calibration tokens) and t the residual the pruned block misses [N, H]:

    correction(x) = bias + (x @ lora_a.T) @ lora_b.T        (checkpoint.py's convention)

- bias (FLAP's bias compensation): the mean of t.  With lora off, this is exactly "the pruned
  neurons' / heads' mean contribution added to the output" (the block is linear in them).
- lora (reduced-rank ridge regression): W = argmin |Tc - Xc W|^2 + lam |W|^2 over centred data
  (lam = ridge * mean eigenvalue of Xc^T Xc), then the rank-r truncation that best keeps Xc W:
  V_r = top-r eigenvectors of W^T Xc^T Xc W (the fitted outputs' principal directions),
  lora_a = (W V_r)^T [r, H], lora_b = V_r [H, r], and bias = t_mean - x_mean W V_r V_r^T.

What t is (`RecoveryConfig.target`), each measured in elastify.py:

    "full_inputs"  x = the full model's normed input; t = block(x) - pruned_block(x)
    "own_inputs"   x = the pruned model's own normed input (earlier layers pruned and corrected);
                   t = block(x) - pruned_block(x)
    "full_stream"  x = the pruned model's own input; t = the full model's residual stream after
                   the block minus the pruned model's: the correction also pulls back the drift
                   earlier layers left (layer-wise matching of the full model)

All levels are fitted in one pass over the layers: the full model's stream and one pruned stream
per level advance together, layer by layer, over all calibration batches (no LM head is needed).
Statistics (X^T X, X^T T, sums) accumulate in fp64 over batches; padding tokens are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from engine.elastic.calibration import TokenBatch
from engine.elastic.torch_model import BlockCorrection, LayerCorrection, LayerSelection, Rope, TorchLlama, rms_norm

TARGETS = ("full_inputs", "own_inputs", "full_stream")


@dataclass(frozen=True)
class RecoveryConfig:
    rank: int = 8  # 0: bias only
    ridge: float = 1e-2  # lam / mean eigenvalue of the inputs' covariance
    # Measured (SmolLM2-135M, 8 dev conversations, 4 calibration sequences; FFN-only allocation at
    # 80, heads from 55 down): perplexity at level 80 / 40, training-free 7.97 / 332:
    #   own_inputs 8.29 / 60.0, full_inputs 8.28 / 98.3, full_stream 10.69 / 242: the pruned
    #   model's own inputs with the local target.  (At 80 the correction neither helps nor hurts
    #   much from 4 sequences; at the floor it matters.)
    target: str = "own_inputs"
    use_bias: bool = True

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"unknown recovery target {self.target!r}; choose from {TARGETS}")


@dataclass
class _Stats:
    """Sufficient statistics of one block's regression over calibration tokens (fp64)."""

    xx: torch.Tensor
    xt: torch.Tensor
    x_sum: torch.Tensor
    t_sum: torch.Tensor
    count: int = 0

    @classmethod
    def empty(cls, hidden: int) -> _Stats:
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        return cls(zeros(hidden, hidden), zeros(hidden, hidden), zeros(hidden), zeros(hidden))

    def add(self, x: torch.Tensor, t: torch.Tensor) -> None:
        x, t = x.double(), t.double()
        self.xx += x.T @ x
        self.xt += x.T @ t
        self.x_sum += x.sum(0)
        self.t_sum += t.sum(0)
        self.count += x.shape[0]


def fit_correction(stats: _Stats, config: RecoveryConfig) -> BlockCorrection:
    """The bias and rank-r pair of one block from its statistics (see the module docstring)."""
    n = stats.count
    x_mean, t_mean = stats.x_sum / n, stats.t_sum / n
    if config.rank == 0:
        return BlockCorrection(bias=t_mean.float() if config.use_bias else None)
    xx = stats.xx - n * torch.outer(x_mean, x_mean)  # centred
    xt = stats.xt - n * torch.outer(x_mean, t_mean)
    lam = config.ridge * float(torch.trace(xx)) / xx.shape[0]
    w = torch.linalg.solve(xx + lam * torch.eye(xx.shape[0], dtype=xx.dtype), xt)  # [H, H]: t ~ x @ w
    _, vectors = torch.linalg.eigh(w.T @ xx @ w)  # ascending eigenvalues
    v_r = vectors[:, -config.rank:]  # [H, r]
    w_r = w @ v_r  # [H, r]
    bias = t_mean - x_mean @ w_r @ v_r.T
    return BlockCorrection(bias=bias.float() if config.use_bias else None, lora_a=w_r.T.float().contiguous(),
                           lora_b=v_r.float().contiguous())


def fit_recovery(model: TorchLlama, batches: Sequence[TokenBatch], submodels: dict[int, list[LayerSelection]],
                 anchors: tuple[int, ...], config: RecoveryConfig,
                 progress: bool = True) -> dict[int, list[LayerCorrection | None]]:
    """Per level value, per layer, the fitted corrections (None for anchor layers)."""
    with torch.no_grad():
        ropes = [model.rope(batch.input_ids.shape[1]) for batch in batches]
        masks = [_token_mask(batch) for batch in batches]
        full = [model.embed(batch.input_ids) for batch in batches]
        pruned = {level: list(full) for level in submodels}
        corrections: dict[int, list[LayerCorrection | None]] = {level: [] for level in submodels}
        for index in tqdm(range(model.config.num_layers), desc="closed-form recovery", disable=not progress):
            if index in anchors:
                full = [model.layer(index, h, rope) for h, rope in zip(full, ropes)]
                for level in submodels:
                    pruned[level] = [model.layer(index, h, rope) for h, rope in zip(pruned[level], ropes)]
                    corrections[level].append(None)
                continue
            full_attn = [h + _attn(model, index, h, rope) for h, rope in zip(full, ropes)]
            full_after = [h + _ffn(model, index, h) for h in full_attn]
            for level, submodel in submodels.items():
                stage = _Layer(model, index, submodel[index], config, masks, ropes)
                attn, pruned_attn = stage.fit("attn", full, full_attn, pruned[level])
                ffn, pruned[level] = stage.fit("ffn", full_attn, full_after, pruned_attn)
                corrections[level].append(LayerCorrection(attn=attn, ffn=ffn))
            full = full_after
    return corrections


@dataclass(frozen=True)
class _Layer:
    """One layer's fitting at one level: its blocks, selection and the batches' masks and ropes."""

    model: TorchLlama
    index: int
    selection: LayerSelection
    config: RecoveryConfig
    masks: list[torch.Tensor]
    ropes: list[Rope]

    def fit(self, block: str, full_before: list[torch.Tensor], full_after: list[torch.Tensor],
            pruned_before: list[torch.Tensor]) -> tuple[BlockCorrection, list[torch.Tensor]]:
        """Fit `block`'s correction; -> it and the pruned stream after the corrected block."""
        stats = _Stats.empty(self.model.config.hidden_size)
        outputs = []
        for batch, mask in enumerate(self.masks):
            x_p = self._norm(block, pruned_before[batch])
            out_p = self._block(block, batch, x_p, pruned=True)
            outputs.append((x_p, out_p))
            x, t = self._regression(block, batch, x_p, out_p, full_before[batch], full_after[batch],
                                    pruned_before[batch])
            stats.add(x[mask], t[mask])
        correction = fit_correction(stats, self.config)
        return correction, [h + correction.apply(x_p, out_p) for h, (x_p, out_p) in zip(pruned_before, outputs)]

    def _regression(self, block: str, batch: int, x_p: torch.Tensor, out_p: torch.Tensor, full_before: torch.Tensor,
                    full_after: torch.Tensor, pruned_before: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        target = self.config.target
        if target == "full_stream":
            return x_p, full_after - (pruned_before + out_p)
        x = x_p if target == "own_inputs" else self._norm(block, full_before)
        pruned = out_p if target == "own_inputs" else self._block(block, batch, x, pruned=True)
        return x, self._block(block, batch, x, pruned=False) - pruned

    def _norm(self, block: str, h: torch.Tensor) -> torch.Tensor:
        name = "input_layernorm" if block == "attn" else "post_attention_layernorm"
        return rms_norm(h, self.model.weights[f"model.layers.{self.index}.{name}.weight"],
                        self.model.config.rms_norm_eps)

    def _block(self, block: str, batch: int, x: torch.Tensor, pruned: bool) -> torch.Tensor:
        if block == "attn":
            heads = self.selection.query_heads if pruned else None
            return self.model.attention_block(self.index, x, self.ropes[batch], heads)
        return self.model.ffn_block(self.index, x, self.selection.ffn_neurons if pruned else None)


def _attn(model: TorchLlama, index: int, h: torch.Tensor, rope: Rope) -> torch.Tensor:
    x = rms_norm(h, model.weights[f"model.layers.{index}.input_layernorm.weight"], model.config.rms_norm_eps)
    return model.attention_block(index, x, rope)


def _ffn(model: TorchLlama, index: int, h: torch.Tensor) -> torch.Tensor:
    x = rms_norm(h, model.weights[f"model.layers.{index}.post_attention_layernorm.weight"],
                 model.config.rms_norm_eps)
    return model.ffn_block(index, x)


def _token_mask(batch: TokenBatch) -> torch.Tensor:
    """[B, T] bool: the real (not padding) tokens.  scored[b, t] covers token t + 1, and token 0
    is always real."""
    mask = torch.zeros(batch.input_ids.shape, dtype=torch.bool)
    mask[:, 0] = True
    mask[:, 1:] = batch.scored
    return mask
