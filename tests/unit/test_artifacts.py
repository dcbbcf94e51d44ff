"""JSON artifacts: strict JSON out, non-finite numbers listed and restored; atomic writes with usual modes."""
import json
import math
import os
import stat

import pytest

from tasa.artifacts import from_json_text, json_bytes, write_json_atomic


def test_non_finite_numbers_become_null_with_their_paths_and_come_back():
    obj = {"costs": {"model.layers.0.q_proj": [1.5, math.nan]}, 3: {"tau": -math.inf}, "ok": [1, "x", None],
           "ppl": math.inf}
    text = json_bytes(obj).decode()
    strict = json.loads(text, parse_constant=lambda c: pytest.fail(f"constant {c}"))
    assert strict["costs"]["model.layers.0.q_proj"] == [1.5, None] and strict["3"]["tau"] is None
    assert [e["path"] for e in strict["non_finite"]["values"]] == [
        ["costs", "model.layers.0.q_proj", 1], ["3", "tau"], ["ppl"]]
    assert [e["value"] for e in strict["non_finite"]["values"]] == ["NaN", "-Infinity", "Infinity"]
    back = from_json_text(text)
    assert "non_finite" not in back and math.isnan(back["costs"]["model.layers.0.q_proj"][1])
    assert back["3"]["tau"] == -math.inf and back["ppl"] == math.inf and back["ok"] == [1, "x", None]


def test_finite_json_is_unchanged_and_lists_cannot_hide_nan():
    assert json.loads(json_bytes({"a": [1.0, 2]})) == {"a": [1.0, 2]}
    with pytest.raises(ValueError, match=r"non-finite numbers at \[1\]"):
        json_bytes([1.0, math.nan])


def test_atomic_write_uses_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary left behind
