"""The quantized form of one weight matrix: what the quantizers (tasa.quant) produce and the exporters
(tasa.export) pack.  A core type, so that neither stage imports the other's package."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantResult:
    """A quantized weight matrix in exportable form.

    weight: (rows, cols) dequantized weight, in the input's dtype.
    codes:  (rows, cols) uint8 integer codes, original column order.
    scales: (rows, n_groups) float32.
    zeros:  (rows, n_groups) float32 holding integer zero points.
    g_idx:  (cols,) int32, group of every input column.
    bits, group_size: the grid used (group_size -1 = per channel).
    super_scales: (rows, n_super) float32 for a two-level grid (QuantSpec.super_group), else None: every
            scale is its super-group's super-scale times an integer.
    mins, super_mins: an asymmetric two-level grid's (llama.cpp's Q2_K/Q4_K/Q5_K): per group the offset
            subtracted, ``weight = scale * code - min`` (zeros are then 0), each min its super-group's
            super-min times an integer; None for every other grid.
    rounded: (rows, cols) float32, original column order: the values the quantizer rounded to ``codes`` (GPTQ:
            the weights as its error feedback had updated them), where asked (tasa.quant.gptq.gptq_quantize's
            ``keep_rounded``, for learned rounding from GPTQ); else None.
    """

    weight: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    super_scales: torch.Tensor | None = None
    mins: torch.Tensor | None = None
    super_mins: torch.Tensor | None = None
    rounded: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        """Rebuild the float weight from codes, scales, zeros (or mins) and g_idx."""
        g = self.g_idx.long()
        if self.mins is not None:
            return (self.scales[:, g] * self.codes.float() - self.mins[:, g]).to(self.weight.dtype)
        return (self.scales[:, g] * (self.codes.float() - self.zeros[:, g])).to(self.weight.dtype)
