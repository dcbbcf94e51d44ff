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
    """

    weight: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    super_scales: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        """Rebuild the float weight from codes, scales, zeros and g_idx."""
        g = self.g_idx.long()
        return (self.scales[:, g] * (self.codes.float() - self.zeros[:, g])).to(self.weight.dtype)
