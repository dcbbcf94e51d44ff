"""Where a GGUF export's metadata, tokenizer and unquantized tensors come from.

A GGUF export (tasa.export.gguf) writes tasa's quantized linears and takes everything else from a GGUF of the same
model, its *template*:

- a model read from a GGUF file is its own template;
- a Hugging Face model (a directory, a hub id) takes ``--gguf-template FILE``, any GGUF of the same model
  (llama.cpp's F16/BF16 conversion of it, or one published on the hub), or ``--llama-cpp DIR`` (default:
  ``$LLAMA_CPP_DIR``), a llama.cpp checkout whose ``convert_hf_to_gguf.py`` tasa runs on the model's directory
  (``--outtype auto``: the model's own 16-bit type) into a temporary file that is removed when the export is
  written.  llama.cpp's converter is the maintained map from Hugging Face models to GGUF (architectures,
  hyper-parameters, tokenizer and pre-tokenizer detection, chat template); it runs in this Python, so it needs
  what llama.cpp's requirements list (torch, transformers, sentencepiece: ``pip install tasa[gguf]``), and the
  disk for one 16-bit copy of the model.

A template must be the model's: :func:`check_template` compares every planned linear's tensor shape and the values
of the float tensors outside the decoder layers (final norm, and embeddings and head when they are float) with the
model's own, so a GGUF of another model (the base model of an instruct one, another size) is refused, naming the
tensor, before any quantization.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import numpy as np
import torch

from tasa.errors import TasaError

CONVERTER = "convert_hf_to_gguf.py"
LLAMA_CPP_ENV = "LLAMA_CPP_DIR"
FLOAT_TYPES = ("F32", "F16", "BF16")
VALUE_RTOL = 1e-2  # relative RMS difference a 16-bit copy of a tensor stays far below (float16: ~3e-4)


@dataclass(frozen=True)
class TemplateSource:
    """How a GGUF export gets its template: ``file`` (the source GGUF or --gguf-template), or ``converter`` (the
    llama.cpp checkout whose convert_hf_to_gguf.py makes one from ``hf_dir``)."""

    file: Path | None = None
    converter: Path | None = None
    described: str = ""

    @property
    def needs_conversion(self) -> bool:
        return self.file is None


def llama_cpp_dir(given: str | None) -> Path | None:
    """The llama.cpp checkout: ``given`` (--llama-cpp), else $LLAMA_CPP_DIR, else None; an error if it has no
    converter."""
    where = given or os.environ.get(LLAMA_CPP_ENV) or None
    if where is None:
        return None
    path = Path(where).expanduser()
    if not (path / CONVERTER).is_file():
        origin = "--llama-cpp" if given else f"${LLAMA_CPP_ENV}"
        raise TasaError(f"{origin} {path} has no {CONVERTER}: point it at a llama.cpp checkout "
                        "(git clone https://github.com/ggml-org/llama.cpp)")
    return path


def template_source(source_gguf: Path | None, template: str | None, llama_cpp: str | None) -> TemplateSource:
    """The template of a GGUF export whose model was read from ``source_gguf`` (None: a Hugging Face model), or one
    clear error saying how to give one.  Checked before the model loads."""
    if template is not None:
        path = Path(template).expanduser()
        if not path.is_file() or path.suffix != ".gguf":
            raise TasaError(f"--gguf-template {template}: no such .gguf file")
        return TemplateSource(file=path, described=path.name)
    if source_gguf is not None:
        return TemplateSource(file=Path(source_gguf), described=Path(source_gguf).name)
    converter = llama_cpp_dir(llama_cpp)
    if converter is None:
        raise TasaError("GGUF export takes the metadata, tokenizer and unquantized tensors from a GGUF of the model: "
                        "pass --gguf-template FILE (any GGUF of this model, e.g. llama.cpp's convert_hf_to_gguf.py "
                        f"output), or --llama-cpp DIR (or ${LLAMA_CPP_ENV}: a llama.cpp checkout, whose converter "
                        "tasa runs), or read the model from a GGUF file with --model")
    return TemplateSource(converter=converter, described=f"llama.cpp's {CONVERTER} ({converter})")


def convert(hf_dir: str | Path, out_file: Path, llama_cpp: Path) -> Path:
    """``hf_dir`` converted to GGUF by llama.cpp's converter in ``llama_cpp`` (16-bit tensors, ``--outtype auto``);
    its last error line if it fails."""
    cmd = [sys.executable, str(llama_cpp / CONVERTER), str(hf_dir), "--outfile", str(out_file), "--outtype", "auto"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not out_file.is_file():
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        raise TasaError(f"llama.cpp's {CONVERTER} could not convert {hf_dir}: {last}")
    return out_file


@contextmanager
def materialized(template: TemplateSource | None, hf_dir: Callable[[], Path],
                 temp_dir: Callable[[], Path]) -> Iterator[TemplateSource | None]:
    """``template`` with its file at hand: converted now into ``temp_dir()`` from ``hf_dir()`` when it comes from
    llama.cpp's converter, and removed on leaving (the export reads only its metadata and float tensors)."""
    if template is None or not template.needs_conversion:
        yield template
        return
    where = temp_dir()
    try:
        yield dataclasses.replace(template, file=convert(hf_dir(), where / "template.gguf", template.converter))
    finally:
        shutil.rmtree(where, ignore_errors=True)


def _tensor_array(t) -> np.ndarray:
    """A GGUF reader tensor as float32 in the model's (rows, cols) layout."""
    import gguf

    data = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape(tuple(int(n) for n in reversed(t.shape.tolist())))


def check_template(model: torch.nn.Module, reader, tmap, described: str,
                   held: Callable[[torch.nn.Module], ContextManager] = lambda _m: nullcontext()) -> None:
    """An error naming the first tensor of the template ``reader`` that is not ``model``'s: a linear's shape
    (``tmap``: tasa.export.gguf.tensor_map's; a routed expert's within its layer's 3-D tensor), or the values of a
    float tensor outside the decoder layers.  ``held(module)``: a context in which a module's weights are resident
    (a streamed model's reads them)."""
    from tasa.export.gguf import weights_map

    tensors = {t.name: t for t in reader.tensors}
    counts = Counter(tmap.names[m] for m in tmap.experts)
    for module, gname in sorted(tmap.names.items()):
        t = tensors.get(gname)
        if t is None:  # not in the file (a tied head); a planned module without a tensor is plan_types' error
            continue
        weight = model.get_submodule(module).weight
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        if module in tmap.experts:
            if len(shape) != 3 or shape[0] != counts[gname]:
                raise TasaError(f"{described} is not this model's GGUF: {gname} has shape {shape}, not one "
                                f"matrix for each of the model's {counts[gname]} experts")
            shape = shape[1:]
        if shape != tuple(weight.shape):
            raise TasaError(f"{described} is not this model's GGUF: {gname} is {' x '.join(map(str, shape))}, "
                            f"{module} {weight.shape[0]} x {weight.shape[1]}")
    params = dict(model.named_parameters(remove_duplicate=False))
    for gname, hf in sorted(weights_map(model, reader)[1].items()):
        t = tensors.get(gname)
        if t is None or gname.startswith("blk.") or t.tensor_type.name not in FLOAT_TYPES or hf not in params:
            continue
        owner, leaf = hf.rsplit(".", 1)
        module = model.get_submodule(owner)
        with held(module):  # a streamed module's weights are read into new parameters: take them inside
            want = getattr(module, leaf).detach().float().cpu().numpy()
        got = _tensor_array(t)
        if got.shape != want.shape:
            raise TasaError(f"{described} is not this model's GGUF: {gname} has shape {got.shape}, {hf} {want.shape}")
        err = float(np.sqrt(np.mean((got - want) ** 2)) / max(np.sqrt(np.mean(want ** 2)), 1e-12))
        if not err <= VALUE_RTOL:
            raise TasaError(f"{described} is not this model's GGUF: {gname} differs from {hf} "
                            f"(relative RMS difference {err:.3g})")
