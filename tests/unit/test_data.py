import json

import pytest
import torch

from tasa.config import CalibSpec
from tasa.data import apportion, build_calibration, resolve_calibration_source, store
from tasa.data.sources import eval_texts, format_arc, read_jsonl, wikitext_rows
from tasa.errors import TasaError


def test_apportion_largest_remainder():
    assert apportion([0.5, 0.5], 128) == [64, 64]
    assert apportion([1, 1, 1], 10) == [4, 3, 3]
    assert apportion([0.25, 0.75], 7) == [2, 5]
    assert apportion([1, 0], 5) == [5, 0]
    assert sum(apportion([0.1, 0.2, 0.3, 0.4], 33)) == 33


def test_calib_spec_parse():
    spec = CalibSpec.parse("wikitext2:0.5,gsm8k:0.5", nsamples=16, seqlen=32)
    assert spec.sources == (("wikitext2", 0.5), ("gsm8k", 0.5))
    assert CalibSpec.parse("wikitext2").sources == (("wikitext2", 1.0),)
    assert CalibSpec.parse("/tmp/a.jsonl#text:0.25").sources == (("/tmp/a.jsonl#text", 0.25),)
    with pytest.raises(TasaError, match="negative"):
        CalibSpec.parse("wikitext2:-1")
    with pytest.raises(TasaError, match="sum to zero"):
        CalibSpec.parse("wikitext2:0")


def test_mixture_is_exact_deterministic_and_seeded(data_dir, tokenizer):
    spec = CalibSpec.parse("wikitext2:0.5,gsm8k:0.5", nsamples=10, seqlen=64, seed=1)
    a = build_calibration(tokenizer, spec)
    b = build_calibration(tokenizer, spec)
    c = build_calibration(tokenizer, CalibSpec.parse("wikitext2:0.5,gsm8k:0.5", nsamples=10, seqlen=64, seed=2))
    assert a.input_ids.shape == (10, 64) and a.input_ids.dtype == torch.int64
    assert a.counts == {"wikitext2": 5, "gsm8k": 5}
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    # every window is a slice of one source's stream: wikitext2 validation, or gsm8k train rows
    # formatted as question + gold solution
    wiki = "\n\n".join(wikitext_rows(data_dir / "wikitext2" / "validation.txt"))
    texts = [tokenizer.decode(row) for row in a.input_ids]
    from_wiki = [t for t in texts if t in wiki]
    from_gsm = [t for t in texts if t not in from_wiki]
    assert len(from_gsm) == 5
    gsm_stream = "\n\n".join(resolve_calibration_source("gsm8k").load())
    assert all(piece in gsm_stream for t in from_gsm for piece in t.split("\n\n"))  # rows are shuffled
    assert "\nAnswer: " in gsm_stream and gsm_stream.startswith("Question: ")
    # windows are distinct
    assert len({tuple(r.tolist()) for r in a.input_ids}) == 10


def test_calibration_never_uses_evaluation_text(data_dir, tokenizer):
    cal = build_calibration(tokenizer, CalibSpec(nsamples=8, seqlen=64))
    test_ids = tokenizer("\n\n".join(eval_texts("wikitext2")), add_special_tokens=False).input_ids
    test_windows = {tuple(test_ids[i:i + 64]) for i in range(0, len(test_ids) - 64)}
    assert not any(tuple(r.tolist()) in test_windows for r in cal.input_ids)


def test_evaluation_splits_refused(data_dir):
    with pytest.raises(TasaError, match="used for evaluation"):
        resolve_calibration_source("gsm8k/test")
    with pytest.raises(TasaError, match="evaluation split"):
        resolve_calibration_source(str(data_dir / "wikitext2" / "test.txt"))
    assert resolve_calibration_source("gsm8k/train").name == "gsm8k/train"


def test_unknown_dataset_and_split(data_dir):
    with pytest.raises(TasaError, match="unknown dataset 'c4'"):
        resolve_calibration_source("c4")
    with pytest.raises(TasaError, match="no split 'dev'"):
        resolve_calibration_source("gsm8k/dev")


def test_missing_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TASA_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(TasaError, match="TASA_DATA_DIR=.* is not a directory"):
        store.override_dir()


def test_user_files(tmp_path, data_dir, tokenizer):
    txt = tmp_path / "corpus.txt"
    txt.write_text("hello world " * 400)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"q": f"q{i}", "a": f"a{i}"}) + "\n" for i in range(300)))
    assert resolve_calibration_source(f"{rows}#q").load()[:2] == ["q0", "q1"]
    assert resolve_calibration_source(f"{rows}#{{q}} => {{a}}").load()[1] == "q1 => a1"
    with pytest.raises(TasaError, match="say which field"):
        resolve_calibration_source(str(rows))
    with pytest.raises(TasaError, match="no field 'zz'"):
        resolve_calibration_source(f"{rows}#zz").load()
    cal = build_calibration(tokenizer, CalibSpec.parse(f"{txt}:1,{rows}#q:1", nsamples=4, seqlen=32))
    assert cal.input_ids.shape == (4, 32)
    with pytest.raises(TasaError, match="not found"):
        resolve_calibration_source(str(tmp_path / "missing.txt"))


def test_too_small_source_and_seqlen_limit(data_dir, tokenizer):
    with pytest.raises(TasaError, match="yields only"):
        build_calibration(tokenizer, CalibSpec(nsamples=10_000, seqlen=64))
    with pytest.raises(TasaError, match="exceeds the model's maximum"):
        build_calibration(tokenizer, CalibSpec(nsamples=2, seqlen=512), max_length=256)


def test_malformed_jsonl_reports_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(TasaError, match="bad.jsonl:2: malformed JSON"):
        read_jsonl(p)


def test_arc_formatting_handles_numeric_labels():
    row = {"id": "x", "answerKey": "3", "question": {"stem": "Pick", "choices": [
        {"label": "1", "text": "a"}, {"label": "2", "text": "b"}, {"label": "3", "text": "c"}]}}
    assert format_arc(row) == "Question: Pick\nAnswer: c"
