"""GGUF export: llama.cpp's file format, a GGML type per tensor, written with the ``gguf`` package.

Each quantized linear is written in the GGML type whose grid is the one tasa quantized it on, so the file holds
GPTQ's codes and scales bit for bit, and llama.cpp computes with exactly the weights tasa measured (the table is
tasa.allocate.targets.LLAMA_CPP_GRIDS):

| tasa grid (symmetric, signed max; ``QuantSpec``) | GGML type | bits per weight (block scales included) |
| --- | --- | --- |
| 3 bits, groups of 16 in 256-column super-groups, 6-bit group scales | Q3_K | 3.4375 |
| 4 bits, groups of 32 | Q4_0 | 4.5 |
| 5 bits, groups of 32 | Q5_0 | 5.5 |
| 6 bits, groups of 16 in 256-column super-groups, 8-bit group scales | Q6_K | 6.5625 |
| 8 bits, groups of 32 | Q8_0 | 8.5 |
| asymmetric: 2 bits, groups of 16 in 256-column super-groups, 4-bit group scales and mins | Q2_K | 2.625 |
| asymmetric: 4 bits, groups of 32 in 256-column super-groups, 6-bit group scales and mins | Q4_K | 4.5 |
| asymmetric: 5 bits, groups of 32 in 256-column super-groups, 6-bit group scales and mins | Q5_K | 5.5 |

A symmetric code c of b bits stands for ``scale * (c - 2**(b-1))``: the legacy types store that signed value
with an fp16 scale per 32 weights; the K types store per 16 weights an integer k with ``scale = d * k`` and an
fp16 ``d`` per 256 weights (tasa's two-level grid, tasa.quant.rtn); the asymmetric K types store an unsigned
code c with ``scale * c - min``, per group an unsigned integer for each of scale and min, per 256 weights their
fp16 ``d`` and ``dmin``.  llama.cpp's own quantizer never writes the
code -128 in Q8_0 (it scales by amax/127); the format and its kernels take it as the int8 it is.

Everything else comes from the source GGUF the model was loaded from, byte for byte: metadata, tokenizer, chat
template, embeddings, norms, and any linear left unquantized.  Tensor names and the row order of each tensor
(llama.cpp permutes LLaMA's q/k rows) are transformers' own GGUF mapping, run backwards: a row permutation moves
whole rows of codes and scales, so it keeps them exact.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from tasa import __version__
from tasa.allocate.targets import LLAMA_CPP_ASYM_GRIDS, LLAMA_CPP_GRIDS, TARGETS, violations
from tasa.config import QuantSpec
from tasa.errors import TasaError
from tasa.plan import expert_container
from tasa.quantized import QuantResult


def ggml_type(spec: QuantSpec) -> str:
    """The GGML type that holds ``spec``'s grid exactly (tasa.allocate.targets.LLAMA_CPP_GRIDS), or an error
    naming the grids GGUF holds."""
    grid, name, _ = (LLAMA_CPP_GRIDS if spec.sym else LLAMA_CPP_ASYM_GRIDS).get(spec.bits, (None, None, None))
    if grid is not None and not violations({"m": spec}, TARGETS["llama.cpp"], ()):
        return name
    held = "; ".join(f"{t}: {b}-bit{'' if g.sym else ' asymmetric'}, groups of {g.group_size}"
                     + (f" in super-groups of {g.super_group}" if g.super_group else "")
                     for table in (LLAMA_CPP_GRIDS, LLAMA_CPP_ASYM_GRIDS) for b, (g, t, _) in table.items())
    raise TasaError(f"a {spec.bits}-bit {'symmetric' if spec.sym else 'asymmetric'} grid with groups of "
                    f"{spec.group_size}{' and act_order' if spec.act_order else ''} is no GGUF type ({held}); "
                    "allocate with --target llama.cpp")


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    """(..., ) float -> (..., 2) uint8: little-endian fp16."""
    return x.astype("<f2").view(np.uint8).reshape(*x.shape, 2)


def _legacy(codes: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """Q4_0 / Q5_0 / Q8_0 blocks of 32 weights: (rows, cols) codes, (rows, cols / 32) scales -> (rows, bytes)."""
    rows, cols = codes.shape
    c = codes.reshape(rows, cols // 32, 32).astype(np.uint32)
    parts = [_fp16_bytes(scales)]
    if bits == 8:
        parts.append((c.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
    else:
        if bits == 5:
            qh = ((c >> 4) & 1) << np.arange(32, dtype=np.uint32)
            parts.append(qh.sum(axis=2, dtype=np.uint32).astype("<u4").view(np.uint8).reshape(rows, -1, 4))
        parts.append(((c[..., :16] & 15) | ((c[..., 16:] & 15) << 4)).astype(np.uint8))
    return np.concatenate(parts, axis=2).reshape(rows, -1)


def _q3_k(codes: np.ndarray, k: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q3_K blocks of 256 weights (hmask[32], qs[64], scales[12], d): codes 0..7, k (rows, cols / 16) in
    [-32, 31], d (rows, cols / 256)."""
    rows, cols = codes.shape
    nb = cols // 256
    c = codes.reshape(rows, nb, 2, 4, 32).astype(np.uint8)  # [half of 128, shift j, 32 weights]
    shifts = np.arange(4, dtype=np.uint8).reshape(1, 1, 1, 4, 1)
    qs = ((c & 3) << (2 * shifts)).sum(axis=3, dtype=np.uint8).reshape(rows, nb, 64)
    bit = (np.arange(2, dtype=np.uint8).reshape(1, 1, 2, 1, 1) * 4 + shifts)
    hmask = ((c >> 2) << bit).reshape(rows, nb, 8, 32).sum(axis=2, dtype=np.uint8)
    v = (k.reshape(rows, nb, 16) + 32).astype(np.uint8)  # 6 bits each
    low = v & 15
    sc = np.empty((rows, nb, 12), dtype=np.uint8)
    sc[..., :8] = low[..., :8] | (low[..., 8:] << 4)
    hi = (v >> 4).reshape(rows, nb, 4, 4) << (2 * np.arange(4, dtype=np.uint8).reshape(1, 1, 4, 1))
    sc[..., 8:] = hi.sum(axis=2, dtype=np.uint8)
    return np.concatenate([hmask, qs, sc, _fp16_bytes(d)], axis=2).reshape(rows, -1)


def _q6_k(codes: np.ndarray, k: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q6_K blocks of 256 weights (ql[128], qh[64], scales[16] int8, d): codes 0..63, k in [-128, 127]."""
    rows, cols = codes.shape
    nb = cols // 256
    c = codes.reshape(rows, nb, 2, 4, 32).astype(np.uint8)  # [half of 128, quarter t, 32 weights]
    lo = c & 15
    ql = np.concatenate([lo[..., 0, :] | (lo[..., 2, :] << 4), lo[..., 1, :] | (lo[..., 3, :] << 4)], axis=-1)
    qh = ((c >> 4) << (2 * np.arange(4, dtype=np.uint8).reshape(1, 1, 1, 4, 1))).sum(axis=3, dtype=np.uint8)
    sc = k.reshape(rows, nb, 16).astype(np.int8).view(np.uint8)
    return np.concatenate([ql.reshape(rows, nb, 128), qh.reshape(rows, nb, 64), sc, _fp16_bytes(d)],
                          axis=2).reshape(rows, -1)


def _k_scales_mins(k: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales k and mins j (rows, nb, 8): for i < 4, scale i in the low 6
    bits of byte i and min i in those of byte 4 + i; for i >= 4, the low 4 bits of scale i and min i as the low
    and high nibbles of byte 4 + i, and their top 2 bits in the top 2 of bytes i - 4 (scale) and i (min)."""
    k, j = k.astype(np.uint8), j.astype(np.uint8)
    out = np.empty((*k.shape[:2], 12), dtype=np.uint8)
    out[..., 0:4] = k[..., :4] | ((k[..., 4:] >> 4) << 6)
    out[..., 4:8] = j[..., :4] | ((j[..., 4:] >> 4) << 6)
    out[..., 8:12] = (k[..., 4:] & 15) | ((j[..., 4:] & 15) << 4)
    return out


def _q4_5_k(codes: np.ndarray, k: np.ndarray, j: np.ndarray, d: np.ndarray, dmin: np.ndarray,
            bits: int) -> np.ndarray:
    """Q4_K (d, dmin, scales[12], qs[128]) or Q5_K (d, dmin, scales[12], qh[32], qs[128]) blocks of 256 weights:
    codes 0..15 / 0..31 in eight groups of 32, k and j (rows, cols / 32) in 0..63."""
    rows, cols = codes.shape
    nb = cols // 256
    c = codes.reshape(rows, nb, 4, 2, 32).astype(np.uint8)  # [pair of groups, group in pair, 32 weights]
    qs = ((c[..., 0, :] & 15) | ((c[..., 1, :] & 15) << 4)).reshape(rows, nb, 128)
    parts = [_fp16_bytes(d), _fp16_bytes(dmin), _k_scales_mins(k.reshape(rows, nb, 8), j.reshape(rows, nb, 8))]
    if bits == 5:
        hi = (c.reshape(rows, nb, 8, 32) >> 4) << np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
        parts.append(hi.sum(axis=2, dtype=np.uint8))
    parts.append(qs)
    return np.concatenate(parts, axis=2).reshape(rows, -1)


def _q2_k(codes: np.ndarray, k: np.ndarray, j: np.ndarray, d: np.ndarray, dmin: np.ndarray) -> np.ndarray:
    """Q2_K blocks of 256 weights (scales[16]: scale k low nibble, min j high; qs[64]; d; dmin): codes 0..3 in
    sixteen groups of 16, k and j in 0..15."""
    rows, cols = codes.shape
    nb = cols // 256
    c = codes.reshape(rows, nb, 2, 4, 32).astype(np.uint8)  # [half of 128, shift s, 32 weights]
    qs = ((c & 3) << (2 * np.arange(4, dtype=np.uint8).reshape(1, 1, 1, 4, 1))).sum(axis=3, dtype=np.uint8)
    sc = (k.reshape(rows, nb, 16).astype(np.uint8) & 15) | (j.reshape(rows, nb, 16).astype(np.uint8) << 4)
    return np.concatenate([sc, qs.reshape(rows, nb, 64), _fp16_bytes(d), _fp16_bytes(dmin)],
                          axis=2).reshape(rows, -1)


def encode(result: QuantResult, type_name: str, row_order: np.ndarray | None = None) -> np.ndarray:
    """The GGUF bytes (rows, bytes per row) of ``result`` in ``type_name``, rows taken in ``row_order`` (GGUF row
    i is ``result``'s row ``row_order[i]``)."""
    pick = (lambda t: t) if row_order is None else (lambda t: t[torch.as_tensor(row_order)])
    codes = pick(result.codes).cpu().numpy()
    scales = pick(result.scales).float().cpu().numpy()
    if type_name in ("Q4_0", "Q5_0", "Q8_0"):
        return _legacy(codes, scales, result.bits)
    d = pick(result.super_scales).float().cpu().numpy()
    per = scales.shape[1] // d.shape[1]
    k = np.rint(scales / np.repeat(d, per, axis=1)).astype(np.int16)
    if type_name in ("Q2_K", "Q4_K", "Q5_K"):
        dmin = pick(result.super_mins).float().cpu().numpy()
        j = np.rint(pick(result.mins).float().cpu().numpy() / np.repeat(dmin, per, axis=1)).astype(np.int16)
        return _q2_k(codes, k, j, d, dmin) if type_name == "Q2_K" else _q4_5_k(codes, k, j, d, dmin, result.bits)
    return (_q3_k if type_name == "Q3_K" else _q6_k)(codes, k, d)


def weights_map(model, reader) -> tuple[object, dict[str, str]]:
    """transformers' GGUF loader for ``model`` and the GGUF file read by ``reader``: its tensor processor (what it
    does to a tensor on loading) and {GGUF tensor name: the model's parameter name}.  The file's architecture
    names the tensors (a Mixtral GGUF is llama.cpp's ``llama`` with expert tensors)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    arch = reader.fields["general.architecture"].contents()
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.to_dict())
    try:
        return processor, get_gguf_hf_weights_map(model, processor, model_type=arch)
    except NotImplementedError:
        raise TasaError(f"GGUF architecture {arch!r} is unknown to this gguf package") from None


class TensorMap(NamedTuple):
    """Where each linear of a model is in a GGUF file: ``names`` {module: GGUF tensor name}; ``orders`` {module:
    GGUF row order, None where the same}; ``experts`` {module: its index in the 3-D tensor ``names`` gives}, for
    the routed experts (llama.cpp stores a layer's experts of one projection as one (experts, rows, columns)
    tensor, ``blk.N.ffn_{gate,up,down}_exps``)."""

    names: dict[str, str]
    orders: dict[str, np.ndarray | None]
    experts: dict[str, int]


def tensor_map(model, reader) -> TensorMap:
    """For every linear weight of ``model`` the GGUF file read by ``reader`` (a gguf.GGUFReader) holds, where it is
    (:class:`TensorMap`), by transformers' GGUF loader's own name map and tensor processor (what it does to a
    tensor's rows on loading, undone), and for routed experts (tasa.models.moe: ``...experts.{e}.{role}``) by
    gguf-py's name map of the file's architecture (the expert list's ``...experts.{role}`` is its 3-D tensor)."""
    processor, hf_names = weights_map(model, reader)
    names, orders = {}, {}
    for gname, hf in hf_names.items():
        if not hf.endswith(".weight"):
            continue
        module = hf[: -len(".weight")]
        if not _is_linear(model, module):  # embeddings, norms: copied from the source as they are
            continue
        rows = model.get_submodule(module).weight.shape[0]
        probe = np.arange(rows, dtype=np.float64).reshape(rows, 1)
        moved = processor.process(weights=probe, name=gname, tensor_key_mapping={}, parsed_parameters={}).weights
        moved = np.asarray(moved).reshape(-1)
        if moved.shape != (rows,) or not np.array_equal(np.sort(moved), probe.reshape(-1)):
            raise TasaError(f"{module}: transformers' GGUF loader reshapes {gname} beyond a row permutation; "
                            "tasa cannot write it exactly")
        names[module] = gname
        # loading puts GGUF row moved[i] at row i; writing puts row i at GGUF row moved[i]
        orders[module] = None if np.array_equal(moved, probe.reshape(-1)) else np.argsort(moved.astype(np.int64))
    experts = {}
    stacked = _expert_names(model, reader)
    for module, (gname, index) in stacked.items():
        names[module], orders[module], experts[module] = gname, None, index
    return TensorMap(names, orders, experts)


def _expert_names(model, reader) -> dict[str, tuple[str, int]]:
    """{routed-expert linear: (its layer's 3-D GGUF tensor, its index there)} by gguf-py's name map."""
    import gguf

    arch = reader.fields["general.architecture"].contents()
    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        return {}
    name_map = gguf.get_tensor_name_map(by_name[arch], model.config.num_hidden_layers)
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        container = expert_container(name)
        if container is None:
            continue
        index, role = name.split(".")[-2:]
        stacked = name_map.get_name(f"{container}.{role}")
        if stacked is not None:
            out[name] = (stacked + ".weight", int(index))
    return out


def copy_metadata(reader, writer, values: dict | None = None, skip: tuple[str, ...] = ()) -> None:
    """Every key-value field of the GGUF ``reader`` into ``writer`` (its architecture excepted: the writer has it),
    with ``values`` replacing some and the keys in ``skip`` left out."""
    import gguf

    values = values or {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in skip:
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, values.get(key, field.contents()), field.types[0], sub_type=sub)


def _is_linear(model, module: str) -> bool:
    try:
        return isinstance(model.get_submodule(module), torch.nn.Linear)
    except AttributeError:
        return False


def plan_types(plan: dict[str, QuantSpec], tmap: TensorMap, source_name: str) -> dict[str, str]:
    """{module: GGML type} of every planned module; an error for a grid no type holds, a module the source GGUF
    (``tmap``: tensor_map's) has no tensor for, or routed experts that one GGUF tensor holds quantized in part or
    with more than one type."""
    types = {m: ggml_type(s) for m, s in plan.items()}
    missing = sorted(set(plan) - set(tmap.names))
    if missing:
        raise TasaError(f"{missing[0]} has no tensor in {source_name} (GGUF export writes the linears the source "
                        "GGUF holds)")
    stacks: dict[str, list[str]] = {}
    for module in tmap.experts:
        stacks.setdefault(tmap.names[module], []).append(module)
    for gname, members in sorted(stacks.items()):
        held = sorted({types.get(m, "unquantized") for m in members})
        if len(held) > 1:
            raise TasaError(f"{gname}: llama.cpp stores the {len(members)} routed experts of this projection as "
                            f"one tensor of one type, but the plan gives them {', '.join(held)} (allocate with "
                            "--tie-experts, the default)")
    return types


class GgufWriter:
    """A GGUF file: the quantized linears as they finish (spooled to a temporary file), then every other tensor
    and all metadata from the source GGUF ``reader`` reads.  The interface of tasa.export.writer.CheckpointWriter.
    ``types``: plan_types'; ``tmap``: tensor_map's.  A layer's routed experts of one projection are written as
    one 3-D tensor, stacked in expert order."""

    def __init__(self, path: Path, reader, types: dict[str, str], tmap: TensorMap):
        import gguf

        self.path, self.reader, self.types, self.tmap = Path(path), reader, types, tmap
        self.writer = gguf.GGUFWriter(self.path, reader.fields["general.architecture"].contents(), use_temp_file=True)
        self.written: set[str] = set()
        self.packed_bytes = 0
        self.tensor_types: dict[str, str] = {}
        self.expert_counts = {t.name: int(t.shape[-1]) for t in reader.tensors if len(t.shape) == 3}

    def pack(self, name: str, result: QuantResult) -> dict:
        """The on_result packer: {module: (GGUF bytes, type)}."""
        return {name: (encode(result, self.types[name], self.tmap.orders[name]), self.types[name])}

    def add_layer(self, index: int, layer, packed: dict) -> None:
        stacks: dict[str, dict[int, tuple[np.ndarray, str]]] = {}
        for module, (data, t) in packed.items():
            gname = self.tmap.names[module]
            if module in self.tmap.experts:
                stacks.setdefault(gname, {})[self.tmap.experts[module]] = (data, t)
            else:
                self._add(gname, data, t)
        for gname, parts in stacks.items():
            count = self.expert_counts.get(gname)
            types = {t for _data, t in parts.values()}
            if count is None or sorted(parts) != list(range(count)) or len(types) != 1:  # plan_types refuses these
                raise TasaError(f"{gname}: layer {index} quantized experts {sorted(parts)} as {sorted(types)}, but "
                                f"the GGUF tensor holds {count} experts of one type")
            self._add(gname, np.stack([parts[e][0] for e in range(count)]), types.pop())

    def _add(self, gname: str, data: np.ndarray, type_name: str) -> None:
        import gguf

        self.writer.add_tensor(gname, data, raw_dtype=gguf.GGMLQuantizationType[type_name])
        self.written.add(gname)
        self.tensor_types[gname] = type_name
        self.packed_bytes += data.nbytes

    def finish(self) -> None:
        import gguf

        copy_metadata(self.reader, self.writer, skip=("general.file_type", "general.quantized_by"))
        self.writer.add_file_type(gguf.LlamaFileType.GUESSED)  # a type per tensor, no single llama.cpp preset
        self.writer.add_string("general.quantized_by", f"tasa {__version__}")
        for t in self.reader.tensors:
            if t.name not in self.written:
                self.writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
        self.writer.write_header_to_file()
        self.writer.write_kv_data_to_file()
        self.writer.write_tensors_to_file()
        self.writer.close()

    def tensor_type_overrides(self) -> list[str]:
        """llama-quantize --tensor-type-file entries that give every tensor tasa quantized its type."""
        return [f"{re.escape(n)}={t.lower()}" for n, t in sorted(self.tensor_types.items())]
