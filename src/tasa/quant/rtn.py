"""Round-to-nearest (RTN) quantization grids, as pure functions over tensors.

Grid convention.  For a group of weights x (one row, ``g`` input columns), ``maxq = 2**bits - 1``::

    sym:   m     = the element of x with the largest |x|    (m = -1 for an all-zero group)
           zero  = 2**(bits - 1)                            (e.g. 8 for 4 bits)
           scale = fp16(-m / zero)                          # m lands exactly on code 0; negative if m > 0
    asym:  lo = min(min(x), 0)   hi = max(max(x), 0)        # range always holds 0
           (lo == hi == 0)  ->  lo, hi = -1, +1
           scale = fp16((hi - lo) / maxq)   zero = round(-lo / scale)
    code  = clamp(round(x / scale) + zero, 0, maxq)         # integer in [0, maxq]
    x_hat = scale * (code - zero)                           # checkpoints store fp16 scales

The symmetric grid uses all ``2**bits`` levels: it spans m exactly and reaches
``(zero - 1) / zero * |m|`` on the other side (values beyond clip to the last level), the
"signed max" scale of llama.cpp's Q4_0.  The GPTQ reference grid (``scale = 2 max|x| / maxq``)
puts +-max|x| half a step inside the two end levels, so one level is never used; on SmolLM2-135M
(g64) the signed-max grid lowers RTN perplexity from 43.1 to 37.2 at 4 bits and from 212 to 101 at
3 bits.  A negative scale is an ordinary fp16 value to GPTQ kernels (x_hat = scale * (code - zero)),
so the checkpoint format is unchanged.

Two-level grid (``super_group`` columns sharing one super-scale; llama.cpp's K-quants).  For each group of a
super-group, s = -m / zero (m as above, 0 for an all-zero group); then, with ``half = 2**(scale_bits - 1)``::

    d     = fp16(-M / half)              # M: the s with the largest |s| in the super-group
    k     = clamp(round(s / d), -half, half - 1)
    scale = d * k                        # exact in float32; 0 when k == 0 (every code is then ``zero``)

An asymmetric two-level grid (llama.cpp's Q2_K, Q4_K, Q5_K: ``sym`` False with a ``super_group``) subtracts a
per-group offset instead of a zero point.  For each group, (s, z) is its asymmetric grid as above and
mn = s * z >= 0 (the range holds 0); then, with ``top = 2**scale_bits - 1``::

    d     = fp16(max s / top)            dmin = fp16(max mn / top)     # over the super-group
    k     = clamp(round(s / d), 0, top)  j    = clamp(round(mn / dmin), 0, top)
    scale = d * k                        min  = dmin * j
    code  = clamp(round((x + min) / scale), 0, maxq)   (0 where scale is 0)
    x_hat = scale * code - min           # in float32: llama.cpp's own arithmetic, to the bit

Worked example, 4 bits symmetric, x = [-1, 0.5, 0.3]: m = -1, zero = 8, scale = 0.125,
codes = [0, 12, 10], x_hat = [-1, 0.5, 0.25].  A 2-bit asymmetric one, x = [-1, 0, 0.5, 2]: lo=-1, hi=2, scale=1,
zero=1, codes = [0, 1, 1, 3] (torch.round rounds half to even: 0.5 -> 0),
x_hat = [-1, 0, 0, 2].
"""
from __future__ import annotations

import torch

from tasa.config import QuantSpec
from tasa.errors import TasaError
from tasa.numerics import all_finite, nonfinite_count
from tasa.quantized import QuantResult

FP16_MIN_SCALE = 2.0**-24  # the smallest positive fp16 value; a scale never rounds to zero
# The symmetric grid's name, recorded with profiles and run stages so that results made with an earlier grid
# (the GPTQ reference one, tasa < 2026-11-25) are never resumed into or reused.
SYM_GRID = "signed-max"


def fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """The fp16 value a checkpoint stores for ``scale`` (quantize against it, so what is measured is what
    ships), never rounded to zero: magnitudes below fp16's smallest keep their sign at that smallest."""
    s = scale.to(torch.float16).float()
    return torch.where(s.abs() < FP16_MIN_SCALE, torch.copysign(torch.full_like(s, FP16_MIN_SCALE), scale), s)


def compute_grid(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero point for ``x`` of shape (rows, g). Returns two (rows,) tensors."""
    maxq = 2**bits - 1
    x = x.float()
    if sym:
        zero = 2.0 ** (bits - 1)
        m = x.gather(1, x.abs().argmax(dim=1, keepdim=True)).squeeze(1)
        m = torch.where(m == 0, torch.full_like(m, -1.0), m)
        scale = fp16_scale(-m / zero)
        return scale, torch.full_like(scale, zero)
    zero_vec = torch.zeros(x.shape[0], device=x.device)
    lo = torch.minimum(x.min(dim=1).values, zero_vec)
    hi = torch.maximum(x.max(dim=1).values, zero_vec)
    both_zero = (lo == 0) & (hi == 0)
    lo = torch.where(both_zero, torch.full_like(lo, -1.0), lo)
    hi = torch.where(both_zero, torch.full_like(hi, 1.0), hi)
    scale = fp16_scale((hi - lo) / maxq)
    zero = torch.round(-lo / scale)
    return scale, zero


def grid_error(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
               weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per row of ``x`` (rows, g): the squared error of its rounding on the grid, weighted by ``weights`` (g,) or
    (rows, g)."""
    e = (x.float() - dequantize(quantize_codes(x, scale, zero, bits), scale, zero)) ** 2
    return (e if weights is None else e * weights).sum(dim=1)


SEARCH_BAND_ELEMENTS = 2**18  # weights a band of :func:`search_grid` (1 MB in float32: in a core's cache)


def search_grid(x: torch.Tensor, bits: int, sym: bool, steps: int, weights: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``x`` (rows, g), the grid of least weighted squared error among the plain one and ``steps``
    narrower ones (the range shrunk by 1 - k / (2 steps), k = 1..steps; values beyond it clip).  Ties keep the
    wider grid, so the error is never above the plain grid's.

    Rows are searched in bands of :data:`SEARCH_BAND_ELEMENTS`, so that the search's many passes over a band run in
    a core's cache rather than over the whole matrix in memory (the static grids of a batch of experts in GPTQ);
    each row's search is its own, so the grids are the same bit for bit (tests/unit/test_scale_search.py)."""
    band = max(1, SEARCH_BAND_ELEMENTS // max(1, x.shape[1]))
    if steps and x.shape[0] > band:
        scale = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        zero = torch.empty_like(scale)
        for r0 in range(0, x.shape[0], band):
            rows = slice(r0, r0 + band)
            scale[rows], zero[rows] = search_grid(x[rows], bits, sym, steps, weights[rows] if weights is not None
                                                  and weights.dim() == 2 else weights)
        return scale, zero
    scale, zero = compute_grid(x, bits, sym)
    if steps == 0:
        return scale, zero
    best = grid_error(x, scale, zero, bits, weights)
    for k in range(1, steps + 1):
        s, z = compute_grid(x.float() * (1 - k / (2 * steps)), bits, sym)
        err = grid_error(x, s, z, bits, weights)
        better = err < best
        scale, zero, best = torch.where(better, s, scale), torch.where(better, z, zero), torch.minimum(err, best)
    return scale, zero


def compute_super_grid(x: torch.Tensor, bits: int, group_size: int, scale_bits: int, steps: int = 0,
                       weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two-level grid of one super-group ``x`` (rows, super_group): per-group scales and zeros
    (rows, super_group / group_size) and the super-scales d (rows,).  ``steps``: each group's scale searched
    first (:func:`search_grid`, ``weights`` (super_group,) or (rows, super_group)), then made an integer multiple
    of d."""
    rows = x.shape[0]
    sub = x.float().reshape(rows, -1, group_size)
    zero = 2.0 ** (bits - 1)
    s = -sub.gather(2, sub.abs().argmax(dim=2, keepdim=True)).squeeze(2) / zero  # (rows, groups)
    if steps:  # the searched scales, every group of every row at once (an all-zero group keeps 0: not to set d)
        w = None if weights is None else weights.expand(rows, -1).reshape(-1, group_size)  # row r*groups+j: group j
        found = search_grid(sub.reshape(-1, group_size), bits, True, steps, w)[0].view(rows, -1)
        s = torch.where(s == 0, s, found)
    half = 2.0 ** (scale_bits - 1)
    top = s.gather(1, s.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    d = fp16_scale(-top / half)  # an all-zero super-group: the smallest fp16, every k 0
    k = torch.clamp(torch.round(s / d.unsqueeze(1)), -half, half - 1)
    return d.unsqueeze(1) * k, torch.full_like(s, zero), d


def compute_super_grid_asym(x: torch.Tensor, bits: int, group_size: int, scale_bits: int, steps: int = 0,
                            weights: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The asymmetric two-level grid of one super-group ``x`` (rows, super_group): per-group scales and mins
    (rows, super_group / group_size), super-scales d and super-mins dmin (rows,); ``steps``, ``weights``: each
    group's range searched first, as :func:`compute_super_grid`'s."""
    rows = x.shape[0]
    sub = x.float().reshape(-1, group_size)  # row r*groups+j: group j of row r
    w = None if weights is None else weights.expand(rows, -1).reshape(-1, group_size)
    s, z = search_grid(sub, bits, False, steps, w)
    s, mn = s.view(rows, -1), (s * z).view(rows, -1)
    top = 2.0 ** scale_bits - 1
    d = fp16_scale(s.max(dim=1).values / top)  # positive: every group's asymmetric scale is
    dmin = fp16_scale(mn.max(dim=1).values / top)  # an all-zero super-group's: the smallest fp16, every j 0
    k = torch.clamp(torch.round(s / d.unsqueeze(1)), 0, top)
    j = torch.clamp(torch.round(mn / dmin.unsqueeze(1)), 0, top)
    return d.unsqueeze(1) * k, dmin.unsqueeze(1) * j, d, dmin


def quantize_codes_min(x: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (as float) of ``x`` (rows, k) on an asymmetric two-level grid (scale, min), each (rows,) or
    (rows, 1); a zero scale gives the code 0 (the weight is then -min)."""
    maxq = 2**bits - 1
    if scale.dim() == 1:
        scale, mins = scale.unsqueeze(1), mins.unsqueeze(1)
    codes = torch.clamp(torch.round((x.float() + mins) / torch.where(scale == 0, 1.0, scale)), 0, maxq)
    return torch.where(scale == 0, 0.0, codes)


def dequantize_min(codes: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    if scale.dim() == 1:
        scale, mins = scale.unsqueeze(1), mins.unsqueeze(1)
    return scale * codes - mins


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (as float) of ``x`` (rows, k) on the grid (scale, zero), each (rows,) or (rows, 1); a zero
    scale (a two-level grid's k = 0) gives the code ``zero``."""
    maxq = 2**bits - 1
    if scale.dim() == 1:
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    codes = torch.clamp(torch.round(x.float() / torch.where(scale == 0, 1.0, scale)) + zero, 0, maxq)
    return torch.where(scale == 0, zero, codes)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    if scale.dim() == 1:
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    return scale * (codes - zero)


def group_bounds(cols: int, group_size: int) -> list[tuple[int, int]]:
    """Column ranges of the groups; the last one may be shorter (ragged)."""
    if group_size == -1 or group_size >= cols:
        return [(0, cols)]
    return [(s, min(s + group_size, cols)) for s in range(0, cols, group_size)]


def check_finite(weight: torch.Tensor, name: str = "weight") -> None:
    if not all_finite(weight):
        bad = nonfinite_count(weight)
        raise TasaError(f"{name} holds {bad} NaN/Inf values; refusing to quantize it")


def check_super_width(cols: int, super_group: int, name: str = "weight") -> None:
    if cols % super_group:
        raise TasaError(f"{name}: {cols} input columns are not a multiple of the {super_group}-column super-group")


def rtn_quantize_spec(weight: torch.Tensor, spec: QuantSpec, weights: torch.Tensor | None = None) -> QuantResult:
    """:func:`rtn_quantize` on ``spec``'s grid."""
    return rtn_quantize(weight, spec.bits, spec.group_size, spec.sym, spec.super_group, spec.scale_bits,
                        spec.scale_search, weights)


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool, super_group: int = 0,
                 scale_bits: int = 6, scale_search: int = 0, weights: torch.Tensor | None = None) -> QuantResult:
    """Round-to-nearest quantization of a (rows, cols) weight, group-wise along columns (two-level scales over
    ``super_group`` columns when it is not 0; each group's range searched among ``scale_search`` narrower ones,
    by squared error weighted by ``weights`` (cols,), e.g. the inputs' mean squares; None: equal weights)."""
    if weight.dim() != 2:
        raise TasaError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    check_finite(weight)
    rows, cols = weight.shape
    if super_group:
        check_super_width(cols, super_group)
        n = cols // super_group
        x = weight.reshape(rows * n, super_group)
        w = None if weights is None else weights.float().view(n, super_group).repeat(rows, 1)  # row r*n+j: j
        per = super_group // group_size
        g_idx = (torch.arange(cols, device=weight.device) // group_size).to(torch.int32)
        if not sym:
            scale, mins, d, dmin = compute_super_grid_asym(x, bits, group_size, scale_bits, scale_search, w)
            q = quantize_codes_min(x.reshape(-1, group_size), scale.reshape(-1), mins.reshape(-1), bits)
            deq = dequantize_min(q, scale.reshape(-1), mins.reshape(-1)).view(rows, cols)
            return QuantResult(deq.to(weight.dtype), q.to(torch.uint8).view(rows, cols), scale.view(rows, n * per),
                               torch.zeros(rows, n * per, device=weight.device), g_idx, bits, group_size,
                               d.view(rows, n), mins.view(rows, n * per), dmin.view(rows, n))
        scale, zero, d = compute_super_grid(x, bits, group_size, scale_bits, scale_search, w)
        q = quantize_codes(x.reshape(-1, group_size), scale.reshape(-1), zero.reshape(-1), bits)
        deq = dequantize(q, scale.reshape(-1), zero.reshape(-1)).view(rows, cols)
        return QuantResult(deq.to(weight.dtype), q.to(torch.uint8).view(rows, cols), scale.view(rows, n * per),
                           zero.view(rows, n * per), g_idx, bits, group_size, d.view(rows, n))
    bounds = group_bounds(cols, group_size)
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(rows, len(bounds), dtype=torch.float32, device=weight.device)
    zeros = torch.empty_like(scales)
    deq = torch.empty(rows, cols, dtype=torch.float32, device=weight.device)
    g_idx = torch.empty(cols, dtype=torch.int32, device=weight.device)
    # The full-width groups at once, as (rows x groups) rows of one group each: the grid is row-wise,
    # so this is the per-group computation, in one pass instead of one small pass per group.
    width = bounds[0][1]
    full = sum(1 for s, e in bounds if e - s == width)
    end = full * width
    x = weight[:, :end].reshape(rows * full, width)
    w = None if weights is None else weights[:end].float().view(full, width).repeat(rows, 1)  # row r*full+j: j
    scale, zero = search_grid(x, bits, sym, scale_search, w)
    q = quantize_codes(x, scale, zero, bits)
    codes[:, :end] = q.to(torch.uint8).view(rows, end)
    deq[:, :end] = dequantize(q, scale, zero).view(rows, end)
    scales[:, :full], zeros[:, :full] = scale.view(rows, full), zero.view(rows, full)
    g_idx[:end] = torch.arange(end, device=weight.device) // width
    if end < cols:  # a ragged last group
        scale, zero = search_grid(weight[:, end:], bits, sym, scale_search,
                                  None if weights is None else weights[end:].float())
        q = quantize_codes(weight[:, end:], scale, zero, bits)
        codes[:, end:] = q.to(torch.uint8)
        deq[:, end:] = dequantize(q, scale, zero)
        scales[:, full], zeros[:, full] = scale, zero
        g_idx[end:] = full
    return QuantResult(deq.to(weight.dtype), codes, scales, zeros, g_idx, bits, group_size)
