"""tasa: task-aware mixed-precision post-training quantization of LLMs."""
__version__ = "0.1.0"
