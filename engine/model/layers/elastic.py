"""Elastic submodels inside a layer: which columns of a prefix-ordered weight each row uses, and
the per-level recovery side paths.

Every level keeps a prefix of a layer's FFN neurons (and of its rank-major query-head slots), its
width non-increasing as the level index grows (engine/elastic/spec.py).  With the step's rows in
level order (widest first, ForwardBatch.ElasticRows), the rows that use a column are a prefix of
the rows, so a batch that mixes levels splits each weight into column tiles, each computed once
for all the rows that use it:

    widths per level index:   w0 >= w1 >= w2          rows_upto: r0 <= r1 <= r2 (== all rows)

    columns:   0 ........... w2 ...... w1 ...... w0
    rows 0..r0   [--------- all of w0 -----------]      level 0 rows use every column
    rows ..r1    [------- w1 --------]                  level 1 rows use [0, w1)
    rows ..r2    [--- w2 ---]                           level 2 rows use [0, w2)

    tiles (num_rows, start, end):  (r0, w1, w0), (r1, w2, w1), (r2, 0, w2)

so each weight column is read once a step whatever the mix (gate/up: out[:n, a:b] = x[:n] @
W[a:b]^T; down and o_proj: y[:n] += h[:n, a:b] @ W[:, a:b]^T).  Tiles with equal row counts
merge, so a batch at one level is one tile: the plain prefix GEMM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.model.forward_batch import ElasticRows

Tile = tuple[int, int, int]  # (num_rows, start column, end column)


def column_tiles(widths: Sequence[int], rows_upto: Sequence[int]) -> list[Tile]:
    """The tiles above: columns [start, end) are used by level-order rows [0, num_rows).  They do
    not overlap, and row i's tiles cover exactly [0, width of i's level)."""
    tiles: list[Tile] = []
    for index, (width, num_rows) in enumerate(zip(widths, rows_upto)):
        start = widths[index + 1] if index + 1 < len(widths) else 0
        if num_rows == 0 or start >= width:
            continue
        if tiles and tiles[-1][0] == num_rows and tiles[-1][1] == width:
            tiles[-1] = (num_rows, start, tiles[-1][2])  # same rows, adjacent columns: one GEMM
        else:
            tiles.append((num_rows, start, width))
    return tiles


@dataclass(frozen=True)
class SidePath:
    """A level's recovery term for one block (attention or FFN) of one layer: the block's output
    gains `bias + (x @ lora_a^T) @ lora_b^T`, x the block's normed input.  Bias compensation
    stands in for the pruned channels' mean contribution, the low-rank path for what varies."""

    bias: torch.Tensor | None  # [hidden], the model's dtype
    lora_a: torch.Tensor | None  # [rank, hidden], fp32
    lora_b: torch.Tensor | None  # [hidden, rank], fp32

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> None:
        """out += this path's contribution for the rows x (both [rows, hidden], in place)."""
        # PERF: fp32, whatever the model's dtype: on CPU a bf16 [32, 576] x [576, 8] product took
        # ~600 us (oneDNN lays out its operands each call), the fp32 one a few; it is exact-er too.
        if self.lora_a is not None:
            out.add_((x.to(self.lora_a.dtype) @ self.lora_a.T) @ self.lora_b.T)
        if self.bias is not None:
            out += self.bias


@dataclass(frozen=True)
class BlockElasticity:
    """One block of one layer across the levels (index 0 = the full model)."""

    widths: tuple[int, ...]  # columns each level keeps: FFN neurons, or query-head slots x head_dim
    side_paths: tuple[SidePath | None, ...]  # per level index; None at the full level

    def bounds(self, offset: int = 0) -> tuple[int, ...]:
        """Where this block's tiles start and end (column_tiles cuts at level widths), + offset."""
        return tuple(sorted({offset, *(offset + width for width in self.widths)}))

    @property
    def is_whole(self) -> bool:
        """Every level runs the whole block with no side path (an anchor layer's blocks)."""
        return all(width == self.widths[0] for width in self.widths) and all(p is None for p in self.side_paths)

    def add_side_paths(self, out: torch.Tensor, x: torch.Tensor, rows: ElasticRows) -> None:
        """Each level's side path on its own rows (level order, in place)."""
        for index, path in enumerate(self.side_paths):
            start, end = rows.level_rows(index)
            if path is not None and end > start:
                path.add_to(out[start:end], x[start:end])


@dataclass(frozen=True)
class LayerElasticity:
    ffn: BlockElasticity
    attention: BlockElasticity
