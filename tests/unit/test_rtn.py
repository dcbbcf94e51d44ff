import pytest
import torch

from tasa.errors import TasaError
from tasa.quant.rtn import compute_grid, dequantize, group_bounds, quantize_codes, rtn_quantize


def test_asymmetric_2bit_hand_example():
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    r = rtn_quantize(w, bits=2, group_size=-1, sym=False)
    assert r.scales.item() == pytest.approx(1.0)
    assert r.zeros.item() == 1.0
    assert r.codes.tolist() == [[0, 1, 1, 3]]  # round(0.5) = 0 (half to even)
    assert r.weight.tolist() == [[-1.0, 0.0, 0.0, 2.0]]


def test_symmetric_4bit_hand_example():
    w = torch.tensor([[-1.0, 0.5, 0.3]])
    r = rtn_quantize(w, bits=4, group_size=-1, sym=True)
    # signed max: the extreme -1 lands exactly on code 0, scale -(-1)/8, zero point 8
    assert r.scales.item() == 0.125 and r.zeros.item() == 8.0
    assert r.codes.tolist() == [[0, 12, 10]]  # 0.5 / 0.125 = 4; 0.3 / 0.125 = 2.4 -> 2
    assert r.weight.tolist() == [[-1.0, 0.5, 0.25]]


def test_symmetric_grid_takes_the_sign_of_the_extreme_and_uses_every_level():
    w = torch.tensor([[1.0, -0.5, -0.9, 0.0]])
    r = rtn_quantize(w, bits=3, group_size=-1, sym=True)
    assert r.scales.item() == -0.25 and r.zeros.item() == 4.0  # positive extreme: negative scale
    # 1 / -0.25 = -4 -> code 0 -> x_hat 1 exactly; -0.5 -> 2 -> 6; -0.9 -> 3.6 -> 4 -> 8 clips to code 7 (-0.75)
    assert r.codes.tolist() == [[0, 6, 7, 4]]
    assert r.weight.tolist() == [[1.0, -0.5, -0.75, 0.0]]
    # 8 distinct levels over [-0.75, 1]: the 3-bit grid of the GPTQ reference (scale 2/7) reaches 1 only as 6/7
    assert sorted((r.scales * (torch.arange(8.0) - 4)).flatten().tolist()) == [-0.75, -0.5, -0.25, 0.0, 0.25, 0.5,
                                                                                 0.75, 1.0]


def test_symmetric_grid_error_is_below_the_reference_grids_on_gaussian_weights():
    """The signed-max grid against the GPTQ reference one (scale 2 max|x| / maxq): less squared error."""
    w = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    for bits in (2, 3, 4):
        ref_scale = (2 * w.abs().amax(1, keepdim=True) / (2**bits - 1)).half().float()
        ref_zero = torch.full_like(ref_scale, 2.0 ** (bits - 1))
        ref = dequantize(quantize_codes(w, ref_scale, ref_zero, bits), ref_scale, ref_zero)
        ours = rtn_quantize(w, bits, -1, True).weight
        assert (ours - w).pow(2).sum() < (ref - w).pow(2).sum()


def test_range_always_contains_zero_and_zero_rows():
    scale, zero = compute_grid(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]), bits=2, sym=False)
    # positive-only row: lo clamps to 0 -> scale 3/3, zero 0
    assert scale.tolist() == [1.0, float(torch.tensor(2.0 / 3).half())]
    assert zero.tolist() == [0.0, 2.0]  # all-zero row uses [-1, 1]


def test_scales_are_fp16_values_and_never_zero():
    w = torch.randn(8, 64) * torch.logspace(-12, 2, 8)[:, None]
    r = rtn_quantize(w, bits=4, group_size=32, sym=True)
    assert torch.equal(r.scales, r.scales.half().float()) and (r.scales != 0).all()
    assert torch.isfinite(r.weight).all() and torch.equal(r.weight, r.dequantize())


def test_ragged_groups_and_g_idx():
    assert group_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert group_bounds(10, -1) == [(0, 10)]
    w = torch.randn(3, 10)
    r = rtn_quantize(w, bits=3, group_size=4, sym=False)
    assert r.g_idx.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert r.scales.shape == (3, 3)
    # each group quantized independently: same as quantizing its slice alone
    alone = rtn_quantize(w[:, 8:], bits=3, group_size=-1, sym=False)
    assert torch.equal(r.weight[:, 8:], alone.weight)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("sym", [True, False])
def test_codes_in_range_error_bounded_and_dequantize_consistent(bits, sym):
    torch.manual_seed(bits)
    w = torch.randn(16, 64) * 0.1
    r = rtn_quantize(w, bits=bits, group_size=16, sym=sym)
    assert int(r.codes.max()) <= 2**bits - 1
    assert torch.allclose(r.dequantize(), r.weight)
    step = r.scales[:, r.g_idx.long()].abs()
    # inside the grid's range the rounding error is at most half a step (sym clips the far side by one step); the
    # fp16 scale (relative error <= 2^-11) can shift the range's ends by up to 2^bits * 2^-11 steps more
    bound = step * ((1.0 if sym else 0.5) + 2.0**bits * 2.0**-11) + 1e-6
    assert ((w - r.weight).abs() <= bound).all()


def test_more_bits_less_error():
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    errs = [(w - rtn_quantize(w, b, 32, False).weight).pow(2).mean().item() for b in range(2, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:]))


def test_quantize_codes_clamps():
    codes = quantize_codes(torch.tensor([[-100.0, 100.0]]), torch.tensor([1.0]), torch.tensor([2.0]), bits=2)
    assert codes.tolist() == [[0.0, 3.0]]


def test_nan_weights_rejected():
    w = torch.randn(4, 8)
    w[1, 2] = float("nan")
    with pytest.raises(TasaError, match="NaN/Inf"):
        rtn_quantize(w, 4, -1, True)


@pytest.mark.parametrize("cols,group_size", [(96, 32), (100, 32), (20, 32), (64, -1), (70, 7)])
@pytest.mark.parametrize("sym", [True, False])
def test_matches_group_by_group_definition(cols, group_size, sym):
    w = torch.randn(9, cols, generator=torch.Generator().manual_seed(cols)) * torch.rand(9, 1) * 3
    w[3] = 0  # an all-zero row
    r = rtn_quantize(w, 3, group_size, sym)
    for gi, (s, e) in enumerate(group_bounds(cols, group_size)):  # each group on its own, as the grid is defined
        scale, zero = compute_grid(w[:, s:e], 3, sym)
        q = quantize_codes(w[:, s:e], scale, zero, 3)
        assert torch.equal(r.scales[:, gi], scale) and torch.equal(r.zeros[:, gi], zero)
        assert torch.equal(r.codes[:, s:e], q.to(torch.uint8))
        assert torch.equal(r.weight[:, s:e], dequantize(q, scale, zero))
        assert (r.g_idx[s:e] == gi).all()
