from __future__ import annotations

import pytest
import torch

from engine.kernels.elastic_gemm import elastic_gemm, elastic_gemm_reference

# (segment row counts, active widths): decode-like single rows, an empty segment, a zero width,
# full width, widths off the 64-column tile, and a segment longer than one 64-row tile.
SEGMENTS = {
    "decode_rows": ([1, 1, 1, 1], [32, 150, 64, 1]),
    "empty_and_zero_width": ([3, 0, 5, 2], [150, 70, 0, 65]),
    "long_segment": ([70, 4], [100, 150]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["out", "in"])
@pytest.mark.parametrize("segments", SEGMENTS.values(), ids=SEGMENTS.keys())
def test_matches_reference(dtype: torch.dtype, mode: str, segments: tuple[list[int], list[int]]) -> None:
    rows, widths = segments
    n = k = 150  # widths apply to outputs (mode "out") or input features (mode "in")
    x = torch.randn(sum(rows), k).to(dtype)
    weight = (torch.randn(n, k) / k ** 0.5).to(dtype)
    offsets = torch.tensor([0] + torch.tensor(rows).cumsum(0).tolist(), dtype=torch.int32)
    widths_t = torch.tensor(widths, dtype=torch.int32)
    out = elastic_gemm(x, weight, offsets, widths_t, mode, max(rows))
    expected = elastic_gemm_reference(x, weight, offsets, widths_t, mode, max(rows))
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out, expected, **tolerance)
    if mode == "out":
        for segment, width in enumerate(widths):
            assert not out[offsets[segment]:offsets[segment + 1], width:].any()


def test_rejects_bad_arguments() -> None:
    x, weight = torch.randn(4, 32), torch.randn(16, 32)
    offsets, widths = torch.tensor([0, 4], dtype=torch.int32), torch.tensor([8], dtype=torch.int32)
    with pytest.raises(ValueError, match="mode must be"):
        elastic_gemm(x, weight, offsets, widths, "both", 4)
    with pytest.raises(ValueError, match="need 2 offsets"):
        elastic_gemm(x, weight, offsets[:1], widths, "out", 4)
