import logging

import pytest
import torch

from tasa.config import QuantSpec
from tasa.errors import TasaError
import tasa.quant.gptq as gptq
from tasa.quant.gptq import (_inverse_cholesky, accumulate_hessian, accumulate_shift, float_output_weights,
                             gptq_quantize, gptq_quantize_many, make_empty_hessian, merge_hessians)
from tasa.quant.rtn import rtn_quantize, rtn_quantize_spec


def correlated_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    scale = torch.logspace(0, -2, d)
    return (torch.randn(n, d, generator=g) * scale) @ mix + 0.1 * torch.randn(n, d, generator=g)


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    h = make_empty_hessian(x.shape[1])
    accumulate_hessian(h, 0, x)
    return h


def test_accumulate_hessian_equals_direct_formula_over_batches():
    x = torch.randn(100, 8, dtype=torch.float64).float()
    h = make_empty_hessian(8)
    n = 0
    for chunk in (x[:30], x[30:31], x[31:].reshape(1, 69, 8)):
        n = accumulate_hessian(h, n, chunk)
    assert n == 100
    assert torch.allclose(h, 2.0 / 100 * x.t() @ x, atol=1e-5)


def test_merged_shard_hessians_equal_the_hessian_of_all_tokens():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 7, 16, generator=g) for n in (3, 1, 4, 2)]  # uneven shards of uneven batches
    whole = make_empty_hessian(16)
    n_all = 0
    for x in batches:
        n_all = accumulate_hessian(whole, n_all, x)
    parts = []
    for shard in (batches[:1], batches[1:3], batches[3:], []):  # the last shard saw no token (a routed expert's)
        h, n = make_empty_hessian(16), 0
        for x in shard:
            n = accumulate_hessian(h, n, x)
        parts.append((h, n))
    merged, n = merge_hessians(parts)
    assert n == n_all == 10 * 7
    torch.testing.assert_close(merged, whole, rtol=1e-5, atol=1e-6)
    x = torch.cat([b.reshape(-1, 16) for b in batches])
    torch.testing.assert_close(merged, 2 / n * x.t() @ x, rtol=1e-5, atol=1e-5)
    empty, none = merge_hessians([(make_empty_hessian(4), 0)])
    assert none == 0 and not empty.any()


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size,block", [(-1, 128), (16, 128), (16, 8), (12, 32), (20, 16)])
def test_identity_hessian_equals_rtn(sym, group_size, block):
    torch.manual_seed(1)
    w = torch.randn(24, 64)
    r = gptq_quantize(w, torch.eye(64), QuantSpec(bits=3, group_size=group_size, sym=sym, block_size=block))
    ref = rtn_quantize(w, 3, group_size, sym)
    assert torch.equal(r.codes, ref.codes)
    assert torch.allclose(r.weight, ref.weight)
    assert torch.equal(r.g_idx, ref.g_idx)


def test_identity_hessian_act_order_static_groups_equals_rtn():
    torch.manual_seed(2)
    w = torch.randn(8, 32)
    r = gptq_quantize(w, torch.eye(32), QuantSpec(bits=4, group_size=8, act_order=True, static_groups=True))
    ref = rtn_quantize(w, 4, 8, True)
    assert torch.equal(r.codes, ref.codes)
    assert torch.equal(r.g_idx, ref.g_idx)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("spec", [
    QuantSpec(bits=3, group_size=16),
    QuantSpec(bits=4, group_size=-1, sym=False),
    QuantSpec(bits=3, group_size=16, act_order=True),
    QuantSpec(bits=2, group_size=32, act_order=True, static_groups=True),
])
def test_gptq_output_error_at_most_rtn(seed, spec):
    x = correlated_inputs(512, 64, seed)  # (n, d_in)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(100 + seed))
    r = gptq_quantize(w, hessian_of(x), spec)
    ref = rtn_quantize(w, spec.bits, spec.group_size, spec.sym)
    err_gptq = (x @ (w - r.weight).t()).norm()
    err_rtn = (x @ (w - ref.weight).t()).norm()
    assert err_gptq < err_rtn


def test_result_is_consistent_and_deterministic_with_act_order():
    x = correlated_inputs(256, 48, 7)
    w = torch.randn(16, 48)
    spec = QuantSpec(bits=4, group_size=16, act_order=True)
    a = gptq_quantize(w, hessian_of(x), spec)
    b = gptq_quantize(w, hessian_of(x), spec)
    assert torch.equal(a.weight, b.weight)
    assert torch.allclose(a.dequantize(), a.weight)
    assert torch.bincount(a.g_idx.long()).tolist() == [16, 16, 16]  # three full groups
    assert int(a.codes.max()) <= 15


def test_inputs_not_modified_and_dead_columns_zeroed():
    x = correlated_inputs(128, 16, 3)
    x[:, 5] = 0.0  # a dead input channel
    w = torch.randn(4, 16)
    h = hessian_of(x)
    w0, h0 = w.clone(), h.clone()
    r = gptq_quantize(w, h, QuantSpec(bits=4, group_size=-1, sym=False))
    assert torch.equal(w, w0) and torch.equal(h, h0)
    assert torch.all(r.weight[:, 5] == 0)


def test_cholesky_failure_retries_with_more_damping_then_raises(caplog):
    w = torch.randn(4, 8)
    bad = -torch.eye(8)  # negative definite: no damping can help
    with caplog.at_level(logging.WARNING, logger="tasa.quant.gptq"):
        with pytest.raises(TasaError, match="not positive definite"):
            gptq_quantize(w, bad, QuantSpec(bits=4, group_size=-1), name="layer.x")
    assert "retrying with damp" in caplog.text


def test_a_retry_starts_from_the_undamaged_hessian():
    """An indefinite H that 1% damping cannot fix but 10% can: the failed factorisation overwrote its working copy,
    and the retry must start from H again, giving exactly what GPTQ at damp 0.1 gives on the first try."""
    h = hessian_of(correlated_inputs(64, 16, 3))
    h[5, 5] = -0.05 * torch.diag(h).mean()  # the 1% damping leaves it negative, the 10% makes it positive
    w = torch.randn(6, 16)
    retried = gptq_quantize(w, h, QuantSpec(bits=3, group_size=-1, damp=0.01))
    direct = gptq_quantize(w, h, QuantSpec(bits=3, group_size=-1, damp=0.1))
    assert torch.equal(retried.codes, direct.codes) and torch.equal(retried.weight, direct.weight)


def test_inverse_cholesky_in_the_matrix_own_storage_with_no_transient_copy():
    """The upper factor of (H + damp)^-1 comes out of H's own storage, bit for bit what the textbook sequence of
    whole-matrix calls gives, and no step allocates a second matrix (torch's row-major route computed into a
    column-major temporary: 0.8 GB more at GPTQ's peak for a 14336-wide input)."""
    from torch.profiler import ProfilerActivity, profile
    n = 96
    h = hessian_of(correlated_inputs(200, n, 4))
    damped = h.clone()
    damped.diagonal().add_(0.01 * torch.diag(h).mean())
    reference = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    work = h.clone()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        u = _inverse_cholesky(lambda b: work.unsqueeze(0), 0.01, ["x"])[0]
    assert torch.equal(u, reference)
    assert u.data_ptr() == work.data_ptr()
    matrix = n * n * 4
    assert not [(e.name, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage >= matrix // 2]


# ---- several linears at once (gptq_quantize_many): shared factorisations, batched experts ----

RESULT_FIELDS = ("codes", "scales", "zeros", "g_idx", "weight", "super_scales", "mins", "super_mins", "rounded")


def assert_same_result(a, b):
    for f in RESULT_FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        assert x is None or torch.equal(x, y), f


def spy_batches(monkeypatch) -> tuple[list[int], list[int]]:
    """Record the size of every GPTQ batch and of every batch of factorised Hessians."""
    batches, factored = [], []
    run, factor = gptq._gptq_batch, gptq._inverse_cholesky

    def batch(weights, *args):
        batches.append(len(weights))
        return run(weights, *args)

    def inverse(prepared, *args):
        def counted(b):
            h = prepared(b)
            if b is None:
                factored.append(h.shape[0])
            return h
        return factor(counted, *args)
    monkeypatch.setattr(gptq, "_gptq_batch", batch)
    monkeypatch.setattr(gptq, "_inverse_cholesky", inverse)
    return batches, factored


@pytest.mark.parametrize("spec", [QuantSpec(bits=3, group_size=16), QuantSpec(bits=3, group_size=-1, sym=False),
                                  QuantSpec(bits=4, group_size=16, act_order=True, static_groups=True, scale_search=4),
                                  QuantSpec(bits=4, group_size=16, sym=False, act_order=True),
                                  QuantSpec(bits=3, group_size=16, super_group=64),
                                  QuantSpec(bits=4, group_size=16, super_group=64, sym=False, act_order=True,
                                            static_groups=True, scale_search=3)])
@pytest.mark.parametrize("budget", [None, 2 * 4 * 64 * 64])
def test_many_linears_give_each_what_gptq_gives_it_alone(spec, budget, monkeypatch):
    """Four experts, each a gate and an up projection of one shape on its own Hessian (one with a dead input), are
    quantized as two batches (the gates, the ups); two linears of another shape on expert 0's Hessian (k/v-like)
    reuse its factorisation; an expert no token reached is rounded to nearest.  Every result equals gptq_quantize
    of that linear alone, bit for bit (with what each code was rounded from).  Under a budget of two 64-wide
    factors the batches and factorisations hold two at most."""
    if budget:
        monkeypatch.setattr(gptq, "GPTQ_BATCH_BYTES", budget)
    g = torch.Generator().manual_seed(4)
    hessians = []
    for e in range(4):
        x = correlated_inputs(40 + 20 * e, 64, e)
        if e == 2:
            x[:, 9] = 0.0
        hessians.append(hessian_of(x))
    hessians = hessians * 2 + [hessians[0], hessians[0], torch.zeros(64, 64)]
    weights = [torch.randn(12, 64, generator=g) for _ in range(8)] + [torch.randn(8, 64, generator=g)
                                                                       for _ in range(2)]
    weights.append(torch.randn(12, 64, generator=g))
    names = [f"experts.{e}.gate" for e in range(4)] + [f"experts.{e}.up" for e in range(4)] + ["k", "v", "silent"]
    batches, factored = spy_batches(monkeypatch)
    got = list(gptq_quantize_many(weights, hessians, [spec] * 11, names, keep_rounded=True))
    assert sorted(i for i, _, _ in got) == list(range(11)) and all(seconds >= 0 for *_, seconds in got)
    monkeypatch.undo()
    for i, result, _ in got:
        if i == 10:
            expected = rtn_quantize_spec(weights[10], spec)
            expected.rounded = weights[10]
        else:
            expected = gptq_quantize(weights[i], hessians[i], spec, keep_rounded=True)
        assert_same_result(result, expected)
    if budget:  # experts 0-1: gates, ups, then k, v alone; experts 2-3: gates, ups
        assert factored == [2, 2] and batches == [2, 2, 1, 1, 2, 2]
    else:  # one factorisation of the four Hessians; the gates, the ups; k, v alone
        assert factored == [4] and batches == [4, 4, 1, 1]


def test_a_member_of_a_batch_that_is_not_positive_definite_is_retried_alone(caplog):
    """In a batch of three Hessians the middle one needs 10% damping: it is retried alone (named in the warning) and
    gets what GPTQ at damp 0.1 gives it; the others keep 1%.  One that no damping fixes fails naming it."""
    good = [hessian_of(correlated_inputs(64, 16, s)) for s in (1, 2)]
    bad = hessian_of(correlated_inputs(64, 16, 3))
    bad[5, 5] = -0.05 * torch.diag(bad).mean()
    w = [torch.randn(6, 16, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    spec = QuantSpec(bits=3, group_size=-1, damp=0.01)
    with caplog.at_level(logging.WARNING, logger="tasa.quant.gptq"):
        got = {i: r for i, r, _ in gptq_quantize_many(w, [good[0], bad, good[1]], [spec] * 3, ["a", "b", "c"])}
    assert "b: Hessian not positive definite at damp=0.01; retrying with damp=0.1" in caplog.text
    assert "a: Hessian" not in caplog.text and "c: Hessian" not in caplog.text
    assert_same_result(got[1], gptq_quantize(w[1], bad, QuantSpec(bits=3, group_size=-1, damp=0.1)))
    assert_same_result(got[0], gptq_quantize(w[0], good[0], spec))
    assert_same_result(got[2], gptq_quantize(w[2], good[1], spec))
    with pytest.raises(TasaError, match="^c: Hessian is not positive definite"):
        list(gptq_quantize_many(w, [good[0], good[1], -torch.eye(16)], [spec] * 3, ["a", "b", "c"]))


def test_rank_deficient_hessian_handled_by_damping():
    x = torch.randn(3, 16)  # rank 3 < 16
    r = gptq_quantize(torch.randn(4, 16), hessian_of(x), QuantSpec(bits=4, group_size=-1))
    assert torch.isfinite(r.weight).all()


def test_shape_mismatch_and_nan():
    with pytest.raises(TasaError, match="do not match"):
        gptq_quantize(torch.randn(4, 8), torch.eye(7), QuantSpec())
    w = torch.randn(4, 8)
    w[0, 0] = float("inf")
    with pytest.raises(TasaError, match="NaN/Inf"):
        gptq_quantize(w, torch.eye(8), QuantSpec())


# ---- asymmetric calibration (--float-targets): fit the float model's outputs from the quantized model's inputs ----

def test_float_output_weights_are_the_least_squares_fit_to_the_float_outputs():
    """C accumulated over batches is 2/n (X_f - X)^T X; W + W C H^-1 (undamped) is the least-squares V of
    X V^T = X_f W^T, so GPTQ on H approximates the float outputs; alpha scales the correction; C = 0 (the same
    inputs) leaves W."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 24, generator=g)
    xf = x + 0.1 * torch.randn(300, 24, generator=g)  # what the float model feeds the linear
    w = torch.randn(7, 24, generator=g)
    h, c, n = make_empty_hessian(24), make_empty_hessian(24), 0
    for lo, hi in ((0, 120), (120, 300)):
        accumulate_shift(c, n, x[lo:hi], xf[lo:hi])
        n = accumulate_hessian(h, n, x[lo:hi])
    torch.testing.assert_close(c, 2 / 300 * (xf - x).t() @ x, rtol=1e-5, atol=1e-6)
    v = float_output_weights(w, h, c, alpha=1.0, damp=0.0)
    want = torch.linalg.lstsq(x.double(), (xf @ w.t()).double()).solution.t().float()
    torch.testing.assert_close(v, want, rtol=1e-4, atol=1e-4)
    half = float_output_weights(w, h, c, alpha=0.5, damp=0.0)
    torch.testing.assert_close(half, w + 0.5 * (v - w), rtol=1e-4, atol=1e-4)
    assert torch.equal(float_output_weights(w, h, torch.zeros_like(c)), w)
    fit = lambda q: float(((x.double() @ q.double().t() - xf.double() @ w.double().t()) ** 2).sum())  # noqa: E731
    for bits in (3, 8):  # any Q: its error to the float outputs is its H-error to V plus V's own (what GPTQ of V
        spec = QuantSpec(bits=bits, group_size=8)  # minimises), so at 8 bits, where rounding is small, GPTQ of V
        q_v, q_w = gptq_quantize(v, h, spec).weight, gptq_quantize(w, h, spec).weight  # wins by far
        for q in (q_v, q_w):
            assert fit(q) == pytest.approx(float(((x.double() @ (q - want).double().t()) ** 2).sum()) + fit(want),
                                           rel=1e-6)
    assert fit(q_v) - fit(want) < 0.2 * (fit(q_w) - fit(want))  # above the error no linear map avoids


# ---- bfloat16 inputs: each batch's products in bfloat16 where the CPU computes it natively ----

def _bf16_batches(seed: int, batches: int = 32, tokens: int = 256, d: int = 48):
    """A model's bfloat16 inputs (heavy-tailed, correlated) and the float model's, slightly off, batch by batch."""
    g = torch.Generator().manual_seed(seed)
    xs = [correlated_inputs(tokens, d, seed * 1000 + b) * (1 + 9 * (torch.rand(d, generator=g) < 0.05))
          for b in range(batches)]
    xfs = [x + 0.05 * x.abs().mean() * torch.randn(x.shape, generator=g) for x in xs]
    return [x.bfloat16() for x in xs], [x.bfloat16() for x in xfs]


def _sums(xs, xfs):
    d = xs[0].shape[-1]
    h, c, n = make_empty_hessian(d), make_empty_hessian(d), 0
    for x, xf in zip(xs, xfs):
        accumulate_shift(c, n, x, xf)
        n = accumulate_hessian(h, n, x)
    return h, c, n


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_inputs_sum_in_float32_within_three_thousandths_natively_and_exactly_otherwise(monkeypatch, native):
    """bfloat16 inputs: where the CPU computes bfloat16 natively each batch's X^T X (and (X_f - X)^T X) is one
    bfloat16 matrix product, its entries rounded once to 8 bits, summed in float32: H and C within 3e-3 of the
    float64 sums (relative Frobenius; one rounding gives 1.7e-3; GPTQ damps H by 1% of its mean diagonal), and
    GPTQ of a weight on that H as good on the exact H as GPTQ on the exact H, within 1%; elsewhere the float32
    products, equal to the exact sums to float32 rounding.  Float32 inputs never take the bfloat16 path."""
    import tasa.quant.gptq as gptq
    monkeypatch.setattr(gptq, "native_bfloat16", lambda device: native)
    xs, xfs = _bf16_batches(0)
    h, c, n = _sums(xs, xfs)
    x, xf = torch.cat(xs).double(), torch.cat(xfs).double()
    exact_h, exact_c = 2 / n * x.t() @ x, 2 / n * (xf - x).t() @ x
    err = lambda a, b: float(torch.linalg.norm(a.double() - b) / torch.linalg.norm(b))  # noqa: E731
    if native:
        assert 1e-5 < err(h, exact_h) < 3e-3  # (rounded: not the float32 path)
        assert err(c, exact_c) < 3e-3
    else:
        assert err(h, exact_h) < 1e-5 and err(c, exact_c) < 1e-5
    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(1))
    spec = QuantSpec(bits=3, group_size=16, act_order=True, static_groups=True)
    cost = lambda q: float(torch.einsum("ij,jk,ik->", (w - q).double(), exact_h, (w - q).double()))  # noqa: E731
    ours, exact = gptq_quantize(w, h, spec).weight, gptq_quantize(w, exact_h.float(), spec).weight
    assert cost(ours) <= 1.01 * cost(exact)
    f32 = _sums([x.float() for x in xs], [x.float() for x in xfs])
    assert err(f32[0], exact_h) < 1e-5 and err(f32[1], exact_c) < 1e-5  # float32 inputs: float32 products


def test_float_output_weights_solve_in_the_hessian_copy_storage_bit_for_bit():
    """The damped copy of H is factorised in its own storage: exactly torch.linalg.solve's result (dead inputs
    keep their weights), and no step allocates a second (d_in, d_in) matrix (0.8 GB for a 14336-wide input)."""
    from torch.profiler import ProfilerActivity, profile
    g = torch.Generator().manual_seed(5)
    n = 96
    x = torch.randn(300, n, generator=g)
    x[:, 7] = 0.0  # a dead input
    h, c = make_empty_hessian(n), make_empty_hessian(n)
    accumulate_shift(c, 0, x, x + 0.1 * torch.randn(300, n, generator=g))
    accumulate_hessian(h, 0, x)
    w = torch.randn(40, n, generator=g)
    damped = h.clone()
    damped[7, 7] = 1.0
    damped.diagonal().add_(0.01 * torch.diag(damped).mean())
    correction = torch.linalg.solve(damped, (w @ c).t()).t()
    correction[:, 7] = 0.0
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        v = float_output_weights(w, h, c, alpha=0.5, damp=0.01)
    assert torch.equal(v, w + 0.5 * correction)
    big = [(e.name, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage >= n * n * 4 // 2]
    names = [name for name, _ in big]  # the one copy of H it works in (a clone and its allocation), nothing else
    assert names.count("aten::clone") == 1 and set(names) <= {"aten::clone", "aten::empty_strided"}, big


def test_wide_inputs_fold_their_products_in_bands_with_no_full_size_temporary(monkeypatch):
    """Past GRAM_BAND_BYTES a batch's X^T X (and the shift's (X_f - X)^T X) is folded a band of 1024 columns at a
    time (a ragged last band here): the same H and C as the whole product gives, and no op allocates a matrix of
    H's size besides H and C themselves (a 14336-wide input's product is 0.8 GB)."""
    from torch.profiler import ProfilerActivity, profile

    import tasa.quant.gptq as gptq
    g = torch.Generator().manual_seed(6)
    d = 2500
    x = torch.randn(64, d, generator=g)
    xf = x + 0.1 * torch.randn(64, d, generator=g)

    def fold():
        h, c, n = make_empty_hessian(d), make_empty_hessian(d), 0
        for lo in (0, 32):
            accumulate_shift(c, n, x[lo:lo + 32], xf[lo:lo + 32])
            n = accumulate_hessian(h, n, x[lo:lo + 32])
        return h, c
    whole = fold()
    monkeypatch.setattr(gptq, "GRAM_BAND_BYTES", 4 * d * d - 1)
    h, c = make_empty_hessian(d), make_empty_hessian(d)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        n = 0
        for lo in (0, 32):
            accumulate_shift(c, n, x[lo:lo + 32], xf[lo:lo + 32])
            n = accumulate_hessian(h, n, x[lo:lo + 32])
    torch.testing.assert_close(h, whole[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(c, whole[1], rtol=1e-6, atol=1e-7)
    assert not [(e.name, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage >= 4 * d * d // 2]
