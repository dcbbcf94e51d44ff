"""QuantResult.dequantize, computed a band of columns at a time, against the whole-matrix expression."""
import pytest
import torch

import tasa.quantized
from tasa.quantized import QuantResult


def whole(r: QuantResult) -> torch.Tensor:
    g = r.g_idx.long()
    if r.mins is not None:
        return (r.scales[:, g] * r.codes.float() - r.mins[:, g]).to(r.weight.dtype)
    return (r.scales[:, g] * (r.codes.float() - r.zeros[:, g])).to(r.weight.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_mins", [False, True])
def test_banded_dequantize_equals_the_whole_matrix_expression(monkeypatch, dtype, with_mins):
    gen = torch.Generator().manual_seed(0)
    rows, cols, gs = 5, 96, 16
    g_idx = (torch.randperm(cols, generator=gen) // gs).to(torch.int32)  # act-order: groups scattered
    r = QuantResult(weight=torch.empty(0, dtype=dtype), codes=torch.randint(0, 16, (rows, cols), dtype=torch.uint8,
                                                                            generator=gen),
                    scales=torch.rand(rows, cols // gs, generator=gen), zeros=torch.randint(0, 16, (rows, cols // gs),
                                                                                     generator=gen).float(),
                    g_idx=g_idx, bits=4, group_size=gs,
                    mins=torch.rand(rows, cols // gs, generator=gen) if with_mins else None)
    expected = whole(r)
    for band_columns in (1, 7, 96, 1000):  # one column a band, a ragged last band, one band, wider than the matrix
        monkeypatch.setattr(tasa.quantized, "DEQUANTIZE_BAND_BYTES", 4 * rows * band_columns)
        out = r.dequantize()
        assert out.dtype == dtype and torch.equal(out, expected)
