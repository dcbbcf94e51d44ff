"""Models: loading (directory, hub id, GGUF, embedded default) and the architecture walker."""
from tasa.models.arch import SPECS, ArchSpec, LayerModule, ModelArch, discover_spec, resolve
from tasa.models.loading import DEFAULT_MODEL, LoadedModel, embedded_gguf_path, load

__all__ = [
    "DEFAULT_MODEL",
    "SPECS",
    "ArchSpec",
    "LayerModule",
    "LoadedModel",
    "ModelArch",
    "discover_spec",
    "embedded_gguf_path",
    "load",
    "resolve",
]
