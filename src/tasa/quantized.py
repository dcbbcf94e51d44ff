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
        """Rebuild the float weight from codes, scales, zeros (or mins) and g_idx, in the weight's dtype.

        Computed a band of columns at a time into the result (:data:`DEQUANTIZE_BAND_BYTES` of float32 working
        memory per step): the whole-matrix expression holds four float32 temporaries of the matrix's size, 0.9 GB
        for one 4096 x 14336 projection, which set GPTQ's peak on a streamed 8B-shaped layer.  The values are the
        same bit for bit (each element is computed alone)."""
        g = self.g_idx.long()
        rows, cols = self.codes.shape
        out = torch.empty(rows, cols, dtype=self.weight.dtype, device=self.codes.device)
        step = max(1, DEQUANTIZE_BAND_BYTES // (4 * max(rows, 1)))
        for c0 in range(0, cols, step):
            gi, codes = g[c0:c0 + step], self.codes[:, c0:c0 + step].float()
            if self.mins is not None:
                band = self.scales[:, gi] * codes - self.mins[:, gi]
            else:
                band = self.scales[:, gi] * (codes - self.zeros[:, gi])
            out[:, c0:c0 + step] = band
        return out


DEQUANTIZE_BAND_BYTES = 32 * 2**20
