"""GPTQ (Frantar et al., 2022) as pure functions over tensors.

Hessian of the layer-wise objective ||W X - Q X||^2 for inputs X (n tokens, d_in)::

    H = (2 / n) * X^T X                                   # (d_in, d_in)

:func:`accumulate_hessian` keeps this running mean over batches.  Given H,
:func:`gptq_quantize` quantizes W (d_out, d_in) column by column; after each
column it spreads the rounding error over the not-yet-quantized columns through
the upper Cholesky factor U of H^-1 (U^T U = H^-1)::

    for column j:   q_j = Q(w_j);   e_j = (w_j - q_j) / U_jj
                    w_{j+1:} -= e_j U_{j, j+1:}

Updates are applied lazily in blocks of ``block_size`` columns.  With act_order
the columns are visited by decreasing diag(H).  Group grids (scale, zero) are
computed from the *updated* weights when the group's first column is reached,
or up front from the original weights with ``static_groups``.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from tasa.config import QuantSpec
from tasa.errors import TasaError
from tasa.numerics import all_finite, native_bfloat16
from tasa.quant.rtn import (check_finite, check_super_width, compute_super_grid, compute_super_grid_asym,
                            dequantize, dequantize_min, group_bounds, quantize_codes, quantize_codes_min,
                            rtn_quantize_spec, search_grid)
from tasa.quantized import QuantResult

log = logging.getLogger(__name__)

MAX_DAMP_RETRIES = 6


def make_empty_hessian(d_in: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.zeros(d_in, d_in, dtype=torch.float32, device=device)


def _bfloat16_products(x: torch.Tensor) -> bool:
    """Whether a batch's products (:func:`accumulate_hessian`, :func:`accumulate_shift`) are taken in bfloat16:
    for bfloat16 inputs on a CPU that computes it natively (:func:`tasa.numerics.native_bfloat16`).  The
    products of bfloat16 values are exact and the matrix product sums them in float32, rounding each entry of the
    batch's sum once, to 8 bits (by at most 2^-9 of itself): 3.5x faster on a CPU with AVX512-BF16 than the float32
    product, and a Hessian summed in float32 over such batches is within about 2e-3 of the float32 one (relative
    Frobenius norm; the diagonal's roundings, alike batch after batch, do not average out), inside GPTQ's damping
    of 1% of the mean diagonal (tests/unit/test_gptq.py).  Elsewhere they are float32."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and native_bfloat16("cpu")


def _gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^T b of two (tokens, d) batches of one dtype (:func:`_bfloat16_products`)."""
    return a.t() @ b if _bfloat16_products(a) else a.float().t() @ b.float()


def accumulate_hessian(hessian: torch.Tensor, n_seen: int, inputs: torch.Tensor) -> int:
    """Fold a batch of inputs (..., d_in) into the running H = 2/n X^T X, in place (:func:`_gram`).

    Returns the new token count.
    """
    x = inputs.reshape(-1, inputs.shape[-1])  # (tokens, d_in)
    total = n_seen + x.shape[0]
    _fold_gram(hessian, n_seen / total, 2.0 / total, x, x)
    return total


GRAM_BAND_BYTES = 256 * 2**20  # a batch's a^T b folded in bands of columns when it would take more at once


def _fold_gram(acc: torch.Tensor, keep: float, alpha: float, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc = keep * acc + alpha * a^T b (:func:`_gram`), in place.  A product larger than :data:`GRAM_BAND_BYTES`
    (a 14336-wide input's: 0.8 GB, beside H and C of the same size) is taken in bands of 1024 columns, each band
    folded in before the next is computed: each entry the same sum over the same tokens, so the same H and C up to
    the matrix product's own rounding (bit for bit with this machine's BLAS at 2500, 3000 and 14336 columns, in
    float32 and bfloat16; tests/unit/test_gptq.py allows a rounding)."""
    cols = acc.shape[1]
    if 4 * acc.shape[0] * cols <= GRAM_BAND_BYTES:
        acc.mul_(keep).add_(_gram(a, b), alpha=alpha)
        return
    for c0 in range(0, cols, 1024):
        acc[:, c0:c0 + 1024].mul_(keep).add_(_gram(a, b[:, c0:c0 + 1024]), alpha=alpha)


def accumulate_shift(shift: torch.Tensor, n_seen: int, inputs: torch.Tensor, targets: torch.Tensor) -> int:
    """Fold a batch into the running C = 2/n (X_f - X)^T X, in place, where X (..., d_in) are the inputs the
    quantized model feeds a linear and X_f the float model's inputs to it on the same tokens (the asymmetric
    calibration of GPTAQ / GPTQ v2).  ``n_seen`` counts the tokens before this batch, as for
    :func:`accumulate_hessian` (call both with the same count).  Returns the new token count."""
    x = inputs.reshape(-1, inputs.shape[-1])
    if not _bfloat16_products(x):
        x = x.float()
    dx = targets.reshape(-1, targets.shape[-1]).to(x.dtype) - x  # (in bfloat16: rounded to 8 bits of itself)
    total = n_seen + x.shape[0]
    _fold_gram(shift, n_seen / total, 2.0 / total, dx, x)
    return total


def float_output_weights(weight: torch.Tensor, hessian: torch.Tensor, shift: torch.Tensor, alpha: float = 1.0,
                         damp: float = 0.01) -> torch.Tensor:
    """The weights GPTQ should approximate when the layer's quantized model feeds it inputs X but it must reproduce
    the float model's outputs W X_f: W + alpha W C H^-1 (H, C: :func:`accumulate_hessian`, :func:`accumulate_shift`;
    H damped as GPTQ damps it).  At ``alpha`` 1 it is the least-squares solution of min_V ||X V^T - X_f W^T||, so
    ||X Q^T - X_f W^T||^2 = ||X (Q - V)^T||^2 + const: GPTQ of V on H minimises the error to the float outputs
    (GPTAQ's objective, in closed form); smaller ``alpha`` shrinks the correction (fewer calibration tokens than
    inputs: it is estimated with noise).  Inputs that are always zero keep their weights.  For several linears fed
    the same input: :func:`float_output_targets`."""
    return float_output_targets([weight], hessian, [weight.float() @ shift.float()], alpha, damp)[0]


def float_output_targets(weights: list[torch.Tensor], hessian: torch.Tensor, products: list[torch.Tensor],
                         alpha: float = 1.0, damp: float = 0.01) -> list[torch.Tensor]:
    """:func:`float_output_weights` of linears fed the same input (their ``weights``), given their products W C
    instead of C, so that the caller can release C, a (d_in, d_in) matrix, before the solve.

    The damped copy of H is factorised once, in its own storage (seen through its transpose, LAPACK's column-major
    layout, as for :func:`_inverse_cholesky`): ``torch.linalg.solve`` took a second (d_in, d_in) matrix for its
    factors, 0.8 GB for a 14336-wide input.  The same steps as ``torch.linalg.solve``'s, so the same bits."""
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    factors = h.mT
    pivots = torch.empty(h.shape[0], dtype=torch.int32, device=h.device)
    torch.linalg.lu_factor(factors, out=(factors, pivots))
    out = []
    for weight, product in zip(weights, products):
        correction = torch.linalg.lu_solve(factors, pivots, product.t()).t()  # (W C) H^-1, H symmetric
        correction[:, dead] = 0.0
        out.append(correction.mul_(alpha).add_(weight.float()))  # W + alpha * correction, in the correction's memory
        del correction
    return out


def merge_hessians(parts: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, int]:
    """The H = 2/n X^T X of all tokens from those of shards of them ((H_i, n_i) each, as
    :func:`accumulate_hessian` leaves them): sum n_i H_i / sum n_i, and the token count (data-parallel
    calibration reduces the shards' Hessians this way; shards no token reached, n_i = 0, add nothing)."""
    total = sum(n for _, n in parts)
    merged = torch.zeros_like(parts[0][0], dtype=torch.float32)
    if total:
        for h, n in parts:
            if n:
                merged.add_(h.float(), alpha=n / total)
    return merged, total


def _inverse_cholesky(prepared: Callable[[], torch.Tensor], damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*mean(diag H)*I)^-1, H = ``prepared()`` (symmetric), retrying with more
    damping.

    Every step overwrites H's own storage, seen through its transpose: for a symmetric matrix that is the same
    matrix, laid out column by column as LAPACK wants its operands, so torch takes no transient copy of it either
    (given a row-major output it computes into a column-major temporary and copies back: one more (d_in, d_in)
    matrix at the peak, 0.8 GB for a 14336-wide input).  So one matrix is held here: what keeps a streamed
    8B-shaped layer's GPTQ within its memory budget (benchmarks/large_model.py).  The factor is returned as that
    column-major view (the same values as a row-major computation gives, bit for bit).  A retry starts from a
    fresh ``prepared()``."""
    for attempt in range(MAX_DAMP_RETRIES):
        h = prepared()
        h.diagonal().add_(damp * torch.mean(torch.diag(h)))
        ht = h.mT  # column-major: LAPACK's layout
        info = torch.empty((), dtype=torch.int32, device=h.device)
        torch.linalg.cholesky_ex(ht, out=(ht, info))  # ht: its lower factor
        if int(info) == 0:
            torch.cholesky_inverse(ht, out=ht)  # ht: the inverse
            return torch.linalg.cholesky(ht, upper=True, out=ht)  # ht: the inverse's upper factor
        del h, ht
        new_damp = min(damp * 10, 0.99) if damp < 0.99 else damp
        if attempt == MAX_DAMP_RETRIES - 1 or new_damp == damp:
            break
        log.warning("%s: Hessian not positive definite at damp=%g; retrying with damp=%g", name, damp, new_damp)
        damp = new_damp
    raise TasaError(f"{name}: Hessian is not positive definite even with damp={damp:g}; check the calibration data")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, name: str = "weight",
                  keep_rounded: bool = False) -> QuantResult:
    """Quantize ``weight`` (d_out, d_in) with GPTQ under ``spec``, given H (d_in, d_in).  ``keep_rounded``: the
    result also holds the values each code was rounded from (QuantResult.rounded).

    The input tensors are not modified.
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise TasaError(f"{name}: weight {tuple(weight.shape)} and Hessian {tuple(hessian.shape)} do not match")
    check_finite(weight, name)
    if not all_finite(hessian):
        raise TasaError(f"{name}: Hessian holds NaN/Inf (non-finite calibration activations)")
    if not torch.any(hessian):
        # No calibration token reached the module (a routed expert no token was sent to): GPTQ has nothing to
        # weigh its rounding by, and would zero every weight (all inputs look dead).  RTN on the same grid.
        log.warning("%s: no calibration token reached it (zero Hessian); quantized with RTN instead", name)
        result = rtn_quantize_spec(weight, spec)
        result.rounded = weight.detach().float().clone() if keep_rounded else None
        return result
    rows, cols = weight.shape
    bits, gs, sg = spec.bits, spec.group_size, spec.super_group
    if sg:
        check_super_width(cols, sg, name)
    w = weight.detach().float().clone()  # (d_out, d_in)
    diag = torch.diag(hessian).float().clone()
    dead = diag == 0  # inputs that are always zero: H's entry becomes 1, the weights' columns 0
    diag[dead] = 1.0
    w[:, dead] = 0.0

    bounds = group_bounds(cols, gs)
    n_groups = len(bounds)
    gsize = bounds[0][1] - bounds[0][0]  # effective group size (cols if one group)
    scales = torch.empty(rows, n_groups, dtype=torch.float32, device=w.device)
    zeros = torch.empty_like(scales)
    supers = torch.empty(rows, cols // sg, dtype=torch.float32, device=w.device) if sg else None
    per_super = sg // gsize if sg else 0
    with_mins = bool(sg) and not spec.sym  # llama.cpp's asymmetric K types: scale * code - min
    mins = torch.zeros_like(scales) if with_mins else None
    super_mins = torch.empty_like(supers) if with_mins else None

    steps = spec.scale_search  # each group's range searched, its error weighted by the Hessian's diagonal

    def super_grid(x: torch.Tensor, first_group: int, weights: torch.Tensor) -> None:
        """Fill the grids of the super-group whose first group is ``first_group`` from its weights ``x``."""
        span = slice(first_group, first_group + per_super)
        if with_mins:
            scales[:, span], mins[:, span], d, dmin = compute_super_grid_asym(x, bits, gsize, spec.scale_bits, steps,
                                                                              weights)
            zeros[:, span] = 0.0
            super_mins[:, first_group // per_super] = dmin
        else:
            scales[:, span], zeros[:, span], d = compute_super_grid(x, bits, gsize, spec.scale_bits, steps, weights)
        supers[:, first_group // per_super] = d

    if spec.static_groups or n_groups == 1:
        # One grid per row (per channel) comes from the whole row, as in the reference GPTQ.
        if sg:
            for s in range(0, cols, sg):
                super_grid(w[:, s:s + sg], s // gsize, diag[s:s + sg])
        else:
            for gi, (s, e) in enumerate(bounds):
                scales[:, gi], zeros[:, gi] = search_grid(w[:, s:e], bits, spec.sym, steps, diag[s:e])
    precomputed = spec.static_groups or n_groups == 1

    perm = None
    if spec.act_order:
        perm = torch.argsort(diag, descending=True)
        w = w[:, perm]
    diag_order = diag if perm is None else diag[perm]  # the search's weights, in the processing order

    def prepared() -> torch.Tensor:
        """H with dead inputs fixed, in the processing order: a new tensor each call."""
        if perm is None:
            h = hessian.detach().float().clone()
            h[dead, dead] = 1.0
        else:
            h = hessian.detach().float()[perm.unsqueeze(1), perm]  # one gather: no row-permuted intermediate
            h[dead[perm], dead[perm]] = 1.0
        return h
    # g_idx in the processing order: static groups follow original columns,
    # dynamic groups are formed from consecutive processed columns.
    orig_cols = perm if perm is not None else torch.arange(cols, device=w.device)
    if precomputed:
        group_of_pos = torch.div(orig_cols, gsize, rounding_mode="floor")
    else:
        group_of_pos = torch.div(torch.arange(cols, device=w.device), gsize, rounding_mode="floor")

    u = _inverse_cholesky(prepared, spec.damp, name)  # (d_in, d_in) upper
    codes = torch.zeros(w.shape, dtype=torch.uint8, device=w.device)
    rounded = torch.empty_like(w) if keep_rounded else None

    # Blocks hold whole groups (super-groups) so that a dynamic grid sees fully updated weights.
    block = spec.block_size
    if gs != -1 and n_groups > 1:
        unit = sg or gsize
        block = max(1, block // unit) * unit
    cur_scale = cur_zero = None
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        w_blk = w[:, b0:b1].clone()  # (d_out, bs)
        q_blk = torch.zeros_like(w_blk)
        err_blk = torch.zeros_like(w_blk)
        u_blk = u[b0:b1, b0:b1].contiguous()  # (u is column-major: its rows strided)
        for i in range(b1 - b0):
            col = b0 + i
            gi = int(group_of_pos[col])
            if precomputed:
                cur_scale, cur_zero = scales[:, gi], zeros[:, gi]
            elif sg and col % gsize == 0:
                if col % sg == 0:  # the super-group's grids from its weights as updated so far
                    super_grid(w_blk[:, i:i + sg], gi, diag_order[col:col + sg])
                cur_scale, cur_zero = scales[:, gi], zeros[:, gi]
            elif col % gsize == 0:
                end = min(i + gsize, b1 - b0)
                cur_scale, cur_zero = search_grid(w_blk[:, i:end], bits, spec.sym, steps,
                                                  diag_order[col:col + end - i])
                scales[:, gi], zeros[:, gi] = cur_scale, cur_zero
            wcol = w_blk[:, i]
            if with_mins:  # the group's offset, as its scale: a group's grid is filled when its super-group's is
                cur_min = mins[:, gi]
                qcode = quantize_codes_min(wcol.unsqueeze(1), cur_scale, cur_min, bits).squeeze(1)
                qcol = dequantize_min(qcode.unsqueeze(1), cur_scale, cur_min).squeeze(1)
            else:
                qcode = quantize_codes(wcol.unsqueeze(1), cur_scale, cur_zero, bits).squeeze(1)
                qcol = dequantize(qcode.unsqueeze(1), cur_scale, cur_zero).squeeze(1)
            codes[:, col] = qcode.to(torch.uint8)
            if rounded is not None:
                rounded[:, col] = wcol
            q_blk[:, i] = qcol
            err = (wcol - qcol) / u_blk[i, i]
            w_blk[:, i:] -= err.unsqueeze(1) * u_blk[i, i:].unsqueeze(0)
            err_blk[:, i] = err
        w[:, b1:] -= err_blk @ u[b0:b1, b1:]
    del u, w  # before the dequantized result is built: two fewer large matrices at the peak

    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        rounded = None if rounded is None else rounded[:, inv]
        g_idx = group_of_pos[inv].to(torch.int32)
    else:
        g_idx = group_of_pos.to(torch.int32)
    result = QuantResult(
        weight=torch.empty(0),
        codes=codes,
        scales=scales,
        zeros=zeros,
        g_idx=g_idx,
        bits=bits,
        group_size=gs,
        super_scales=supers,
        mins=mins,
        super_mins=super_mins,
        rounded=rounded,
    )
    result.weight = result.dequantize().to(weight.dtype)
    return result
