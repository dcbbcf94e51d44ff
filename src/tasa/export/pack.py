"""GPTQ bit packing, as pure functions: integer codes <-> int32 words.

GPTQ checkpoints (AutoGPTQ / GPTQModel ``checkpoint_format: gptq``) store a
linear layer of shape (out, in) as

- ``qweight`` int32 (ceil(in * bits / 32), out): the codes of each output
  column packed along the input dimension;
- ``qzeros`` int32 (n_groups, ceil(out * bits / 32)): the zero points minus one
  (the v1 convention) packed along the output dimension;
- ``scales`` fp16 (n_groups, out) and ``g_idx`` int32 (in,).

Packing is one little-endian bit stream per column: value ``k`` occupies bits
``k * bits .. k * bits + bits - 1`` of the concatenated 32-bit words.  For 2, 4
and 8 bits a word holds 32 / bits whole values; for 3 bits, 32 values fill three
words and values 10 and 21 straddle word boundaries, the layout GPTQModel's
packer and kernels use.
"""
from __future__ import annotations

import torch

from tasa.errors import TasaError

PACKABLE_BITS = (2, 3, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise TasaError(f"GPTQ checkpoints pack {', '.join(map(str, PACKABLE_BITS))} bits, not {bits}")


def packed_rows(k: int, bits: int) -> int:
    """int32 words holding ``k`` values of ``bits`` bits."""
    return -(-k * bits // 32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(k, n) integer codes in [0, 2**bits) -> (ceil(k * bits / 32), n) int32, packed along dim 0."""
    _check_bits(bits)
    if codes.dim() != 2:
        raise TasaError(f"expected 2-D codes, got shape {tuple(codes.shape)}")
    k, n = codes.shape
    c = codes.to(torch.int64)
    if k and (int(c.min()) < 0 or int(c.max()) >= 2**bits):
        raise TasaError(f"codes out of range for {bits} bits")
    blocks = -(-k // 32)
    padded = torch.zeros((blocks * 32, n), dtype=torch.int64)
    padded[:k] = c
    padded = padded.view(blocks, 32, n)
    words = torch.zeros((blocks, bits, n), dtype=torch.int64)  # 32 values of `bits` bits = `bits` words
    for j in range(32):
        w, s = divmod(j * bits, 32)
        words[:, w] |= (padded[:, j] << s) & 0xFFFFFFFF
        if s + bits > 32:
            words[:, w + 1] |= padded[:, j] >> (32 - s)
    words = words.view(blocks * bits, n)[: packed_rows(k, bits)]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: (words, n) int32 -> (k, n) int64 codes."""
    _check_bits(bits)
    if packed.dim() != 2 or packed.shape[0] != packed_rows(k, bits):
        raise TasaError(f"packed tensor of shape {tuple(packed.shape)} does not hold {k} values of {bits} bits")
    n = packed.shape[1]
    blocks = -(-k // 32)
    words = torch.zeros((blocks * bits, n), dtype=torch.int64)
    words[: packed.shape[0]] = packed.to(torch.int64) & 0xFFFFFFFF
    words = words.view(blocks, bits, n)
    mask = 2**bits - 1
    out = torch.empty((blocks, 32, n), dtype=torch.int64)
    for j in range(32):
        w, s = divmod(j * bits, 32)
        v = words[:, w] >> s
        if s + bits > 32:
            v = v | (words[:, w + 1] << (32 - s))
        out[:, j] = v & mask
    return out.view(blocks * 32, n)[:k]


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(m, k) values -> (m, ceil(k * bits / 32)) int32, packed along dim 1 (GPTQ ``qzeros``)."""
    return pack_rows(values.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    return unpack_rows(packed.t(), bits, k).t().contiguous()
