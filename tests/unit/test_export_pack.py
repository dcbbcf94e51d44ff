"""GPTQ bit packing: exact layouts on hand examples and pack -> unpack identity."""
import pytest
import torch

from tasa.errors import TasaError
from tasa.export.pack import pack_cols, pack_rows, packed_rows, unpack_cols, unpack_rows


def u32(x: int) -> int:
    """An int32 word as the unsigned number its bits spell."""
    return x & 0xFFFFFFFF


def test_4bit_layout_hand_example():
    codes = torch.arange(8).view(8, 1)  # values 0..7 -> nibbles 0x76543210
    assert u32(int(pack_rows(codes, 4)[0, 0])) == 0x76543210
    codes = torch.full((8, 1), 15)
    assert int(pack_rows(codes, 4)[0, 0]) == -1  # all ones: int32 -1


def test_2bit_and_8bit_layouts():
    assert u32(int(pack_rows(torch.tensor([[1], [2], [3]] + [[0]] * 13), 2)[0, 0])) == 0b111001
    assert u32(int(pack_rows(torch.tensor([[0x12], [0x34], [0x56], [0xF8]]), 8)[0, 0])) == 0xF8563412


def test_3bit_layout_matches_gptqmodel():
    """GPTQModel's 3-bit packer: word0 holds values 0..9 and the low 2 bits of value 10; word1 bit 0 its top
    bit, values 11..20 at bits 1..30 and the low bit of value 21 at bit 31; word2 the rest of 21 and 22..31."""
    vals = torch.zeros(32, 1, dtype=torch.long)
    vals[10] = 0b110  # straddles words 0 and 1
    vals[21] = 0b011  # straddles words 1 and 2
    vals[0], vals[11], vals[31] = 5, 7, 1
    w = [u32(int(x)) for x in pack_rows(vals, 3)[:, 0]]
    assert w[0] == 5 | (0b10 << 30)
    assert w[1] == 0b1 | (7 << 1) | (1 << 31)
    assert w[2] == 0b01 | (1 << 29)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [1, 31, 32, 64, 100, 576])
def test_pack_unpack_identity(bits, k):
    g = torch.Generator().manual_seed(bits * 1000 + k)
    codes = torch.randint(0, 2**bits, (k, 5), generator=g)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (packed_rows(k, bits), 5)
    assert torch.equal(unpack_rows(packed, bits, k), codes)
    zeros = torch.randint(0, 2**bits, (3, k), generator=g)
    assert torch.equal(unpack_cols(pack_cols(zeros, bits), bits, k), zeros)


def test_bad_input_is_refused():
    with pytest.raises(TasaError, match="pack 2, 3, 4, 8"):
        pack_rows(torch.zeros(4, 1, dtype=torch.long), 5)
    with pytest.raises(TasaError, match="out of range"):
        pack_rows(torch.tensor([[16]]), 4)
    with pytest.raises(TasaError, match="does not hold"):
        unpack_rows(torch.zeros(3, 1, dtype=torch.int32), 4, 32)
