"""The export formats of ``tasa quantize``, one adapter each, so the pipeline never branches on the format.

An :class:`Export` is made before any quantization work (so what the format cannot write is refused then: the
GPTQ or compressed-tensors quantization config of the plan, the GGUF types of the plan and the template's
match); while the layers are quantized it packs each finished linear (:attr:`Export.packer`) and its writer
stores each finished layer; at the end it writes the files beside the weights and says what the record should
add.  Formats: ``gptq`` and ``compressed-tensors`` (packed linears, safetensors shards, config files), ``fp``
(the dequantized float model), ``gguf`` (one GGUF file for llama.cpp, everything but the quantized linears from
its template).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from tasa.errors import TasaError

GGUF_FILE = "model.gguf"
LLAMA_QUANTIZE_TYPES = "llama-quantize-tensor-types.txt"


@dataclass
class Export:
    """A safetensors export (``gptq``, ``compressed-tensors``, ``fp``): ``packer`` (name, QuantResult) -> the tensors
    stored for a quantized linear (None: its float weight is stored); ``quantization_config`` and ``readme`` go in
    the config files; float tensors are written in ``float_dtype`` (None: as computed)."""

    format: str
    float_dtype: torch.dtype | None
    packer: Callable | None = None
    quantization_config: dict | None = None
    readme: str | None = None

    def writer(self, tmp: Path, lm, arch, max_shard_bytes: int):
        """Where the finished layers are written (tasa.export.writer.CheckpointWriter)."""
        from tasa.export.writer import CheckpointWriter

        return CheckpointWriter(tmp, lm.model, arch.spec.layers_path, max_shard_bytes, self.float_dtype)

    def finish(self, tmp: Path, writer, lm) -> dict:
        """The files beside the weights; returns what the record adds."""
        from tasa.export.writer import write_config_files

        write_config_files(tmp, lm.model, lm.tokenizer, self.quantization_config, self.readme, self.float_dtype)
        return {}


@dataclass
class GgufExport(Export):
    """A GGUF export: the plan's GGML types per tensor (``types``, by ``tensor_map``), written into a copy of the
    template GGUF (``reader``, described as ``described``) by tasa.export.gguf.GgufWriter."""

    reader: object = None
    tensor_map: object = None
    types: dict | None = None
    described: str = ""

    def writer(self, tmp: Path, lm, arch, max_shard_bytes: int):
        from tasa.export.gguf import GgufWriter

        writer = GgufWriter(tmp / GGUF_FILE, self.reader, self.types, self.tensor_map)
        self.packer = writer.pack
        return writer

    def finish(self, tmp: Path, writer, lm) -> dict:
        """README and the llama-quantize tensor types that give the same types from an F16 GGUF (for users who
        prefer llama.cpp's own quantizer)."""
        (tmp / LLAMA_QUANTIZE_TYPES).write_text("\n".join(writer.tensor_type_overrides()) + "\n")
        types = sorted(set(writer.tensor_types.values()))
        (tmp / "README.md").write_text(
            f"# GGUF written by tasa\n\n`{GGUF_FILE}`: llama.cpp's format, one GGML type per tensor "
            f"({', '.join(types)}); the quantized linears hold tasa's codes and scales exactly, everything else "
            f"(metadata, tokenizer, chat template, embeddings, norms) is from {self.described}.\n\n"
            f"    llama-cli -m {GGUF_FILE}\n\nThe same per-tensor types from llama.cpp's own quantizer, starting "
            f"from an F16 GGUF of the model:\n\n    llama-quantize --tensor-type-file {LLAMA_QUANTIZE_TYPES} "
            "model-f16.gguf model-mix.gguf Q8_0\n\n(Q8_0: the type of every tensor the file does not name.)\n")
        return {"float_dtype": f"as stored in {self.described}", "gguf_template": self.described,
                "gguf_types": dict(writer.tensor_types)}


def open_export(fmt: str, plan, lm, arch, target: str, float_dtype: torch.dtype | None, w8a8: bool = False,
                template=None, held=None) -> Export:
    """The export of ``plan`` (the modules' grids, on the model ``lm`` walked by ``arch``) in format ``fmt`` for
    ``target``, its refusals made now, before any quantization work.  ``template``: a GGUF export's template
    (tasa.export.gguf_source), ``held``: module -> context holding its weights (a streamed model), for the check
    that a template other than the model's own source GGUF is this model's."""
    from tasa import __version__

    names = getattr(lm.model, "tasa_checkpoint_names", {})
    linears = [m.name for m in arch.modules]
    if fmt == "fp":
        return Export(fmt, float_dtype)
    if fmt == "gptq":
        from tasa.export.gptq import README, checkpoint_format, pack_result, quantize_config

        layout = checkpoint_format(plan)
        return Export(fmt, float_dtype, lambda n, r: pack_result(n, r, layout),
                      quantize_config(plan, linears, arch.numels(), f"tasa:{__version__}", target, layout, names),
                      README)
    if fmt == "compressed-tensors":
        from tasa.export import compressed_tensors as ct

        return Export(fmt, float_dtype, lambda n, r: ct.pack_result(n, r, plan.modules[n].sym,
                                                                   w8a8 and plan.modules[n].bits == 8),
                      ct.quantization_config(plan, linears, names, w8a8), ct.README)
    if fmt == "gguf":
        import gguf as gguf_py

        from tasa.export import gguf, gguf_source

        reader = gguf_py.GGUFReader(template.file)
        tmap = gguf.tensor_map(lm.model, reader)
        types = gguf.plan_types(plan.modules, tmap, template.described)
        if template.file != lm.gguf:  # a GGUF of the model, not the file it was read from: is it the model's?
            gguf_source.check_template(lm.model, reader, tmap, template.described, held)
        return GgufExport(fmt, None, reader=reader, tensor_map=tmap, types=types, described=template.described)
    raise TasaError(f"unknown export format {fmt!r}")
