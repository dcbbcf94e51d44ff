"""Round-to-nearest (RTN) quantization grids, as pure functions over tensors.

Grid convention (the GPTQ / GPTQModel one, so checkpoints are interchangeable).
For a group of weights x (one row, ``g`` input columns) and ``maxq = 2**bits - 1``::

    lo = min(min(x), 0)          hi = max(max(x), 0)        # range always holds 0
    sym:  hi = max(|lo|, hi); lo = -hi (if lo < 0)
    (lo == hi == 0)  ->  lo, hi = -1, +1
    scale = fp16((hi - lo) / maxq)                        # checkpoints store fp16 scales
    zero  = (maxq + 1) / 2          if sym   (e.g. 8 for 4 bits)
            round(-lo / scale)      otherwise
    code  = clamp(round(x / scale) + zero, 0, maxq)          # integer in [0, maxq]
    x_hat = scale * (code - zero)

Worked example, 2 bits asymmetric, x = [-1, 0, 0.5, 2]: lo=-1, hi=2, scale=1,
zero=1, codes = [0, 1, 1, 3] (torch.round rounds half to even: 0.5 -> 0),
x_hat = [-1, 0, 0, 2].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tasa.errors import TasaError

FP16_MIN_SCALE = 2.0**-24  # the smallest positive fp16 value; a scale never rounds to zero


@dataclass
class QuantResult:
    """A quantized weight matrix in exportable form.

    weight: (rows, cols) dequantized weight, in the input's dtype.
    codes:  (rows, cols) uint8 integer codes, original column order.
    scales: (rows, n_groups) float32.
    zeros:  (rows, n_groups) float32 holding integer zero points.
    g_idx:  (cols,) int32, group of every input column.
    bits, group_size: the grid used (group_size -1 = per channel).
    """

    weight: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        """Rebuild the float weight from codes, scales, zeros and g_idx."""
        g = self.g_idx.long()
        return (self.scales[:, g] * (self.codes.float() - self.zeros[:, g])).to(self.weight.dtype)


def compute_grid(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero point for ``x`` of shape (rows, g). Returns two (rows,) tensors."""
    maxq = 2**bits - 1
    x = x.float()
    zero_vec = torch.zeros(x.shape[0], device=x.device)
    lo = torch.minimum(x.min(dim=1).values, zero_vec)
    hi = torch.maximum(x.max(dim=1).values, zero_vec)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = torch.where(lo < 0, -hi, lo)
    both_zero = (lo == 0) & (hi == 0)
    lo = torch.where(both_zero, torch.full_like(lo, -1.0), lo)
    hi = torch.where(both_zero, torch.full_like(hi, 1.0), hi)
    scale = (hi - lo) / maxq
    # checkpoints store scales as fp16: quantize against the fp16 value, so what is measured is what ships
    scale = scale.to(torch.float16).float().clamp_min(FP16_MIN_SCALE)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-lo / scale)
    return scale, zero


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (as float) of ``x`` (rows, k) on the grid (scale, zero), each (rows,) or (rows, 1)."""
    maxq = 2**bits - 1
    if scale.dim() == 1:
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    return torch.clamp(torch.round(x.float() / scale) + zero, 0, maxq)


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
    if not torch.isfinite(weight).all():
        bad = (~torch.isfinite(weight)).sum().item()
        raise TasaError(f"{name} holds {bad} NaN/Inf values; refusing to quantize it")


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool) -> QuantResult:
    """Round-to-nearest quantization of a (rows, cols) weight, group-wise along columns."""
    if weight.dim() != 2:
        raise TasaError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    check_finite(weight)
    rows, cols = weight.shape
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
    scale, zero = compute_grid(x, bits, sym)
    q = quantize_codes(x, scale, zero, bits)
    codes[:, :end] = q.to(torch.uint8).view(rows, end)
    deq[:, :end] = dequantize(q, scale, zero).view(rows, end)
    scales[:, :full], zeros[:, :full] = scale.view(rows, full), zero.view(rows, full)
    g_idx[:end] = torch.arange(end, device=weight.device) // width
    if end < cols:  # a ragged last group
        scale, zero = compute_grid(weight[:, end:], bits, sym)
        q = quantize_codes(weight[:, end:], scale, zero, bits)
        codes[:, end:] = q.to(torch.uint8)
        deq[:, end:] = dequantize(q, scale, zero)
        scales[:, full], zeros[:, full] = scale, zero
        g_idx[end:] = full
    return QuantResult(deq.to(weight.dtype), codes, scales, zeros, g_idx, bits, group_size)
