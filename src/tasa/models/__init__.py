"""Models: loading (directory, hub id, GGUF, embedded default; in memory or streamed) and the architecture walker."""
from tasa.models.arch import SPECS, ArchSpec, LayerModule, ModelArch, discover_spec, resolve
from tasa.models.loading import DEFAULT_MODEL, LoadedModel, embedded_gguf_path, load
from tasa.models.streaming import compute_device, compute_dtype, streamer_of

__all__ = [
    "DEFAULT_MODEL",
    "SPECS",
    "ArchSpec",
    "LayerModule",
    "LoadedModel",
    "ModelArch",
    "compute_device",
    "compute_dtype",
    "discover_spec",
    "embedded_gguf_path",
    "load",
    "resolve",
    "streamer_of",
]
