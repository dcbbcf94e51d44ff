"""Finite-value checks shared by loading, streaming, the layer walker and the quantizers; whether a device computes
bfloat16 natively."""
from __future__ import annotations

import functools

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


def native_bfloat16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU that supports it, or a CPU with AVX512-BF16 or AMX
    as oneDNN reports (elsewhere torch emulates bfloat16 on a CPU, slower than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and _cpu_bfloat16()


@functools.cache
def _cpu_bfloat16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False
