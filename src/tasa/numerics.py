"""Finite-value checks shared by loading, streaming, the layer walker and the quantizers."""
from __future__ import annotations

import torch


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of floating-point ``t`` is finite (other dtypes always are).  One min/max reduction:
    torch.aminmax propagates NaN, and an infinite element is the minimum or the maximum; on a CPU it reads a
    bfloat16 weight about 20x faster than ``torch.isfinite(t).all()``, which streaming a model paid on every
    decoder layer's first read (24 s of an 8B model's first forward pass)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) and torch.isfinite(hi))


def nonfinite_count(t: torch.Tensor) -> int:
    """How many elements of ``t`` are NaN or infinite (for the error that names them)."""
    return int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0
