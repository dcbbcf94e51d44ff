"""Shared fixtures: tiny random models, a byte-level tokenizer and a tiny data directory."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

WORDS = ("the cat sat on a mat while quantized models compute numbers and people ask "
         "questions about apples oranges trains rivers mountains seven twelve answer").split()


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + <eos>. Fully offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64, vocab: int = 260, max_pos: int = 256):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def random_text(n_words: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(WORDS), (n_words,), generator=g)
    lines = []
    for start in range(0, n_words, 12):
        lines.append(" ".join(WORDS[i] for i in idx[start:start + 12]))
    return "\n".join(lines) + "\n"


@pytest.fixture
def tokenizer():
    return byte_tokenizer()


@pytest.fixture
def tiny_model_dir(tmp_path) -> Path:
    """A tiny random Llama saved as a Hugging Face directory with its tokenizer."""
    path = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    """A tiny data directory in the layout of the built-in data; TASA_DATA_DIR points at it (the override)."""
    root = write_tiny_data(tmp_path / "data")
    monkeypatch.setenv("TASA_DATA_DIR", str(root))
    return root


def write_tiny_data(root: Path) -> Path:
    """The tiny data directory of :func:`data_dir` at ``root``."""
    (root / "wikitext2").mkdir(parents=True)
    (root / "wikitext2" / "validation.txt").write_text(random_text(6000, 1))
    (root / "wikitext2" / "test.txt").write_text(random_text(3000, 2))
    (root / "gsm8k").mkdir()
    for split, n, seed in (("train", 200, 3), ("test", 20, 4)):
        with open(root / "gsm8k" / f"{split}.jsonl", "w") as f:
            for i in range(n):
                q = random_text(20, seed * 1000 + i).strip()
                f.write(json.dumps({"question": q, "answer": f"{i} plus {i} is {2 * i}\n#### {2 * i}"}) + "\n")
    _write_arc(root / "arc_easy")
    _write_mmlu(root / "mmlu")
    return root


def arc_row(i: int, n_choices: int = 4, numeric: bool = False) -> dict:
    labels = [str(k + 1) for k in range(n_choices)] if numeric else list("ABCDE"[:n_choices])
    return {"id": f"q{i}", "question": {"stem": f"which {WORDS[i % len(WORDS)]} number {i}?",
                                        "choices": [{"text": f"{WORDS[(i + k) % len(WORDS)]} {k}", "label": l}
                                                    for k, l in enumerate(labels)]},
            "answerKey": labels[i % n_choices]}


def _write_arc(root: Path) -> None:
    root.mkdir()
    shapes = [(4, False), (3, False), (5, False), (4, True)]
    for split, n in (("train", 12), ("validation", 4), ("test", 8)):
        with open(root / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps(arc_row(i, *shapes[i % 4])) + "\n")


def _write_mmlu(root: Path) -> None:
    root.mkdir()
    for split, n in (("dev", 5), ("test", 6)):
        with open(root / f"{split}.jsonl", "w") as f:
            for subject in ("college_physics", "virology"):
                for i in range(n):
                    f.write(json.dumps({"question": f"{subject} {split} question {i}?", "subject": subject,
                                        "choices": [f"c{k}" for k in range(4)], "answer": i % 4}) + "\n")


@pytest.fixture
def gptqmodel_python() -> Path:
    """The Python of GPTQModel 7.6.0's environment (.venv-gptqmodel from `make test`, or $TASA_GPTQMODEL_PYTHON).

    Missing: the test is skipped, except in CI (CI=true), where it fails: the peer check is never skipped there."""
    env = os.environ.get("TASA_GPTQMODEL_PYTHON")
    venv = Path(__file__).resolve().parents[1] / ".venv-gptqmodel"
    py = Path(env) if env else venv / "bin" / "python"
    if py.is_file() and (env or (venv / ".installed").is_file()):
        return py
    reason = "GPTQModel 7.6.0 is not installed (make test installs it in .venv-gptqmodel; or set TASA_GPTQMODEL_PYTHON)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason + "; CI does not skip it")
    pytest.skip(reason)


@pytest.fixture
def llama_cpp_dir() -> Path:
    """A llama.cpp source tree with its HF -> GGUF converter (.llama-cpp from `make test`, or $LLAMA_CPP_DIR).

    Missing: the test is skipped, except in CI (CI=true), where it fails."""
    env = os.environ.get("LLAMA_CPP_DIR")
    where = Path(env) if env else Path(__file__).resolve().parents[1] / ".llama-cpp"
    if (where / "convert_hf_to_gguf.py").is_file():
        return where
    reason = "llama.cpp's converter is not there (make test fetches it into .llama-cpp; or set LLAMA_CPP_DIR)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason + "; CI does not skip it")
    pytest.skip(reason)


@pytest.fixture
def no_work(monkeypatch):
    import importlib

    def refuse(*a, **k):
        raise AssertionError("expensive work started before the input was checked")

    verbs = {v: importlib.import_module(f"tasa.pipeline.{v}") for v in ("common", "quantize", "search_mixture", "run")}
    monkeypatch.setattr(verbs["common"], "load", refuse)  # every verb loads its model through common.model_of
    monkeypatch.setattr(verbs["run"], "search_mixture", refuse)
    monkeypatch.setattr(verbs["quantize"], "quantize_model", refuse)
