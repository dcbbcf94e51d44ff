import pytest
import torch

from tasa.numerics import all_finite, nonfinite_count


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_all_finite_finds_every_nonfinite_value_wherever_it_is(dtype):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(37, 53, generator=gen).to(dtype)
    assert all_finite(base) and nonfinite_count(base) == 0
    for bad in (float("nan"), float("inf"), float("-inf")):
        for pos in [(0, 0), (36, 52), (18, 7)]:
            t = base.clone()
            t[pos] = bad
            assert not all_finite(t) and nonfinite_count(t) == 1, (bad, pos)
    t = base.clone()
    t[3, :5] = float("nan")
    t[4, 0] = float("inf")
    assert not all_finite(t) and nonfinite_count(t) == 6
    huge = torch.full((4,), torch.finfo(dtype).max, dtype=dtype)  # finite extremes, whose sum would overflow
    assert all_finite(huge) and all_finite(-huge)


def test_all_finite_agrees_with_isfinite_and_takes_any_tensor():
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        t = torch.randn(int(torch.randint(1, 200, (1,), generator=gen)), generator=gen)
        mask = torch.rand(t.shape, generator=gen) < 0.02
        t[mask] = float("nan") if torch.rand(1, generator=gen) < 0.5 else float("inf")
        assert all_finite(t) == bool(torch.isfinite(t).all())
        assert nonfinite_count(t) == int(mask.sum())
    assert all_finite(torch.empty(0)) and all_finite(torch.tensor(3.0))
    assert all_finite(torch.arange(10)) and nonfinite_count(torch.arange(10)) == 0  # integers are finite
    assert not all_finite(torch.tensor(float("nan")))
