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

That is how weights with views run (dense and quantized).  A weight prepacked for oneDNN has no
views, and a call costs 20-80 us whatever its size, so there each level width keeps its whole
slice prepacked, and a step runs every row through the widest present level's slices, one call
per linear (level slices, Linear.runs_level_slices; engine/model/llama.py, elastic_path): a
narrower row's extra columns are zeroed before the block's second GEMM (zero_dropped_columns).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from engine.kernels.cpu import decode_layer
from engine.model.forward_batch import ElasticRows
from engine.model.layers.linear import SliceExtension

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

    @functools.cached_property
    def kernel_operands(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(lora_a, lora_b^T), both [rank, hidden] fp32 contiguous: the C++ kernel's layout, made
        once and shared by the tile path and the fused decode layer (the same operands, the same bits)."""
        if self.lora_a is None:
            return None, None
        return self.lora_a.float().contiguous(), self.lora_b.float().T.contiguous()

    def add_to(self, out: torch.Tensor, x: torch.Tensor, native: bool = False) -> None:
        """out += this path's contribution for the rows x (both [rows, hidden], in place).
        `native`: the C++ kernel the fused decode layer uses, so that both give the same bits
        (a one-ulp difference here flips Q8 activation roundings downstream)."""
        if native and decode_layer.elastic_side_path(*self.kernel_operands, self.bias, x, out):
            return
        # PERF: fp32, whatever the model's dtype: on CPU a bf16 [32, 576] x [576, 8] product took
        # ~600 us (oneDNN lays out its operands each call), the fp32 one a few; it is exact-er too.
        if self.lora_a is not None:
            out.add_((x.to(self.lora_a.dtype) @ self.lora_a.T) @ self.lora_b.T)
        if self.bias is not None:
            out += self.bias


@dataclass(frozen=True)
class FoldedSidePaths:
    """Every level's side path of one block, stacked so that they ride in the block's own GEMMs
    (level slices, Linear.forward_level): the levels' lora_a appended to the first linear's output
    rows (QKV, gate/up), their lora_b to the second's input columns (o_proj, down).  The first
    GEMM then yields every level's side-path hidden; a row keeps its own level's columns, the
    others are zeroed (fill_hidden), and its level's bias is added to the second's output.
    PERF: as calls of their own the side paths took ~5 small ops a block and a level (~2.5 ms of
    a 32-row decode step at level 40); here they cost a product and, for mixed rows, a bias add."""

    lora_a: torch.Tensor | None  # [sum of ranks, hidden]
    lora_b: torch.Tensor | None  # [hidden, sum of ranks]
    masks: torch.Tensor  # [levels, sum of ranks]: 1 on each level's own columns
    biases: tuple[torch.Tensor | None, ...]  # per level index
    bias_table: torch.Tensor | None  # [levels, hidden] the biases, zeros where a level has none
    _masks_as: dict[torch.dtype, torch.Tensor] = field(default_factory=dict, compare=False)  # masks by dtype

    @classmethod
    def stack(cls, paths: Sequence[SidePath | None]) -> FoldedSidePaths:
        low_rank = [p for p in paths if p is not None and p.lora_a is not None]
        ranks = [0 if p is None or p.lora_a is None else p.lora_a.shape[0] for p in paths]
        # Explicit device: models are built under a meta-device context, these tables are not weights.
        device = next((t.device for p in paths if p is not None for t in (p.lora_a, p.bias) if t is not None), "cpu")
        masks = torch.zeros(len(paths), sum(ranks), device=device)
        for index, (start, rank) in enumerate(zip(itertools.accumulate([0, *ranks]), ranks)):
            masks[index, start:start + rank] = 1
        biases = tuple(None if p is None else p.bias for p in paths)
        some_bias = next((b for b in biases if b is not None), None)
        bias_table = None if some_bias is None else torch.stack([some_bias.new_zeros(some_bias.shape) if b is None else b
                                                                  for b in biases])
        return cls(lora_a=torch.cat([p.lora_a for p in low_rank]) if low_rank else None,
                   lora_b=torch.cat([p.lora_b for p in low_rank], dim=1) if low_rank else None,
                   masks=masks, biases=biases, bias_table=bias_table)

    @property
    def size(self) -> int:
        return self.masks.shape[1]

    def extensions(self) -> tuple[SliceExtension | None, SliceExtension | None]:
        """What the block's first and second linear append to every level slice."""
        if self.lora_a is None:
            return None, None
        return SliceExtension(self.lora_a), SliceExtension(self.lora_b)

    def fill_hidden(self, stacked: torch.Tensor, out: torch.Tensor, levels: RowLevels) -> None:
        """out [T, size] <- `stacked` [T, size] on each row's own level's columns, zeros elsewhere."""
        if self.size:
            if stacked.dtype not in self._masks_as:  # PERF: cast once, not every layer and step
                self._masks_as[stacked.dtype] = self.masks.to(stacked.dtype)
            masks = self._masks_as[stacked.dtype]
            torch.mul(stacked, masks[levels.single] if levels.single is not None else masks[levels.rows.row_levels],
                      out=out)

    def bias_of_one_level(self, levels: RowLevels) -> torch.Tensor | None:
        """The bias to hand the second GEMM: its level's, when the rows are of one level."""
        return None if levels.single is None else self.biases[levels.single]

    def add_biases(self, out: torch.Tensor, levels: RowLevels) -> None:
        """Rows of several levels: each row's level's bias (in place)."""
        if levels.single is None and self.bias_table is not None:
            out += self.bias_table[levels.rows.row_levels]


@dataclass(frozen=True)
class BlockElasticity:
    """One block of one layer across the levels (index 0 = the full model)."""

    widths: tuple[int, ...]  # columns each level keeps: FFN neurons, or query-head slots x head_dim
    side_paths: tuple[SidePath | None, ...]  # per level index; None at the full level

    @property
    def is_whole(self) -> bool:
        """Every level runs the whole block with no side path (an anchor layer's blocks)."""
        return all(width == self.widths[0] for width in self.widths) and all(p is None for p in self.side_paths)

    @functools.cached_property
    def folded(self) -> FoldedSidePaths:
        return FoldedSidePaths.stack(self.side_paths)

    def add_side_paths(self, out: torch.Tensor, x: torch.Tensor, rows: ElasticRows, native: bool = False) -> None:
        """Each level's side path on its own rows (level order, in place); `native` as SidePath.add_to."""
        for index, path in enumerate(self.side_paths):
            start, end = rows.level_rows(index)
            if path is not None and end > start:
                path.add_to(out[start:end], x[start:end], native)


@dataclass(frozen=True)
class LayerElasticity:
    ffn: BlockElasticity
    attention: BlockElasticity


@dataclass(frozen=True)
class RowLevels:
    """A step's rows as one block's level-slice path sees them (batch order throughout)."""

    rows: ElasticRows | None  # None: every row at level index `single` (the full level, of a whole step)
    single: int | None  # the level index every row is at, None when they mix
    widest: int  # the widest (lowest) level index present

    @classmethod
    def of(cls, rows: ElasticRows | None) -> RowLevels:
        if rows is None:
            return cls(None, 0, 0)
        present = [index for index, start, end in rows.level_groups()]
        return cls(rows, present[0] if len(present) == 1 else None, present[0])


def zero_dropped_columns(x: torch.Tensor, levels: RowLevels, widths: Sequence[int]) -> None:
    """Rows computed at the widest level present: zero the columns each narrower row's level
    drops (neurons, or query-head slots), so that the next GEMM reads none of them."""
    if levels.single is None:
        row_widths = levels.rows.per_row(tuple(widths))
        columns = torch.arange(x.shape[1], device=x.device)
        x.masked_fill_(columns[None, :] >= row_widths[:, None], 0)
