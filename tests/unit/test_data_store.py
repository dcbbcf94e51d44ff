"""The built-in datasets shipped in the package, the $TASA_DATA_DIR override and the hub data source."""
import hashlib
import json
import lzma
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasa.data import builtin_rows, eval_texts, resolve_calibration_source, store
from tasa.errors import TasaError

REPO = Path(__file__).resolve().parents[2]

# Official split sizes (rows), as published with each dataset.
OFFICIAL_ROWS = {
    "wikitext2/validation.txt": 3760, "wikitext2/test.txt": 4358,
    "gsm8k/train.jsonl": 7473, "gsm8k/test.jsonl": 1319,
    "arc_easy/train.jsonl": 2251, "arc_easy/validation.jsonl": 570, "arc_easy/test.jsonl": 2376,
    "arc_challenge/train.jsonl": 1119, "arc_challenge/validation.jsonl": 299, "arc_challenge/test.jsonl": 1172,
    "mmlu/dev.jsonl": 285, "mmlu/test.jsonl": 14042,
    "mbpp/full.jsonl": 974, "mbpp/test.jsonl": 500,
}


@pytest.fixture
def package_data(monkeypatch):
    """The package copy, with no override."""
    monkeypatch.delenv("TASA_DATA_DIR", raising=False)
    monkeypatch.delenv("TASA_DATA_SOURCE", raising=False)


def test_manifest_lists_every_file_with_sha_rows_source_and_licence():
    m = store.manifest()
    assert set(m["files"]) == set(OFFICIAL_ROWS)
    licences = {rel.split("/")[0]: e["licence"] for rel, e in m["files"].items()}
    assert licences == {"wikitext2": "CC BY-SA 3.0", "gsm8k": "MIT", "arc_easy": "CC BY-SA 4.0",
                        "arc_challenge": "CC BY-SA 4.0", "mmlu": "MIT", "mbpp": "CC BY 4.0"}
    for rel, e in m["files"].items():
        assert e["rows"] == OFFICIAL_ROWS[rel], rel
        assert re.fullmatch(r"[0-9a-f]{64}", e["sha256"]) and e["source"]
    packed = sum((store.PACKAGE_DIR / f"{rel}.xz").stat().st_size for rel in m["files"])
    assert packed < 6 * 2**20  # the repository budget for the built-in data


def test_package_copy_decompresses_to_its_recorded_bytes_and_rows(package_data):
    for rel, e in store.manifest()["files"].items():
        data = lzma.decompress((store.PACKAGE_DIR / f"{rel}.xz").read_bytes())
        assert hashlib.sha256(data).hexdigest() == e["sha256"] and len(data) == e["bytes"]
    rows, where = builtin_rows("gsm8k", "train")
    assert where == "tasa:gsm8k/train.jsonl" and len(rows) == 7473
    assert rows[0]["answer"].endswith("#### 72")  # Natalia's clips, the first GSM8K train row
    assert len(builtin_rows("mmlu", "test")[0]) == 14042
    wiki = builtin_rows("wikitext2", "validation")[0]
    assert len(wiki) == 3760 and sum(1 for r in wiki if r) == 2461
    assert wiki[1] == " = Homarus gammarus = \n"
    assert len(store.split_rows("mbpp", "calib", "mbpp/full.jsonl")[0]) == 974
    # the calibration rows of MBPP drop the 500 test tasks
    assert len(builtin_rows("mbpp", "calib")[0]) == len(resolve_calibration_source("mbpp").load()) == 474


def test_damaged_package_copy_is_refused(package_data, tmp_path, monkeypatch):
    copy = tmp_path / "builtin"
    shutil.copytree(store.PACKAGE_DIR, copy)
    monkeypatch.setattr(store, "PACKAGE_DIR", copy)
    monkeypatch.setattr(store, "_VERIFIED", {})
    # same length, other content: valid xz of different bytes
    original = lzma.decompress((copy / "gsm8k/test.jsonl.xz").read_bytes())
    (copy / "gsm8k/test.jsonl.xz").write_bytes(lzma.compress(original.replace(b"Janet", b"Jenny", 1)))
    with pytest.raises(TasaError, match=r"gsm8k/test.jsonl.xz is damaged \(sha256"):
        builtin_rows("gsm8k", "test")
    (copy / "arc_easy/test.jsonl.xz").write_bytes(b"not xz")
    with pytest.raises(TasaError, match="damaged \\(not valid xz\\)"):
        eval_texts("arc_easy")
    (copy / "mmlu/dev.jsonl.xz").unlink()
    with pytest.raises(TasaError, match="have no mmlu/dev.jsonl; reinstall"):
        builtin_rows("mmlu", "dev")


def test_override_dir_replaces_the_package_copy(data_dir):
    rows, where = builtin_rows("gsm8k", "train")
    assert where == str(data_dir / "gsm8k" / "train.jsonl") and len(rows) == 200
    assert store.fingerprint() == f"dir:{data_dir.resolve()}"
    with pytest.raises(TasaError, match="data file not found: .*mbpp/full.jsonl .*TASA_DATA_DIR overrides"):
        resolve_calibration_source("mbpp")


def test_calibrating_on_a_copy_of_an_evaluation_split_is_refused(package_data, tmp_path):
    copy = tmp_path / "my_corpus.txt"
    copy.write_text(store.package_text("wikitext2/test.txt"))
    with pytest.raises(TasaError, match="evaluation split"):
        resolve_calibration_source(str(copy))
    own = tmp_path / "own.txt"
    own.write_text(store.package_text("wikitext2/validation.txt"))  # a calibration split is fine
    assert resolve_calibration_source(str(own)).load()


def test_no_source_file_refers_to_the_workspace_data():
    """The product and its tests read the package copy, never the workspace folder beside the repository."""
    pattern = re.compile(r"\.\./shared|shared/data")
    offenders = [str(p.relative_to(REPO)) for top in ("src", "tests") for p in (REPO / top).rglob("*")
                 if p.is_file() and p.suffix in (".py", ".yaml", ".json", ".toml", ".txt", ".md")
                 and pattern.search(p.read_text(encoding="utf-8", errors="replace"))
                 and p.name != "test_data_store.py"]
    assert offenders == []


# ---- the hub, through the same `datasets` code path, on local folders in the hub's layout ----

MBPP_FEATURES = ["dataset_info:", "- config_name: full", "  features:"] + [
    line for name, kind in (("task_id", "dtype: int32"), ("text", "dtype: string"), ("code", "dtype: string"),
                            ("test_list", "sequence: string"), ("test_setup_code", "dtype: string"),
                            ("challenge_test_list", "sequence: string"))
    for line in (f"  - name: {name}", f"    {kind}")]


def _hub_folder(root: Path, configs: dict, header: list[str] = ()) -> Path:
    """A local dataset repository like the hub's: files per config/split and the README's `configs` list."""
    lines = ["---", *header, "configs:"]
    for config, splits in configs.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        for split, rows in splits.items():
            rel = f"{config}/{split}.jsonl"
            (root / config).mkdir(parents=True, exist_ok=True)
            (root / rel).write_text("".join(json.dumps(r) + "\n" for r in rows))
            lines += [f"  - split: {split}", f"    path: {rel}"]
    (root / "README.md").write_text("\n".join(lines + ["---", ""]))
    return root


def _arc_to_hub(row: dict) -> dict:
    q = row["question"]
    return {"id": row["id"], "question": q["stem"], "answerKey": row["answerKey"],
            "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]}}


@pytest.fixture
def hub_mirror(tmp_path, monkeypatch, package_data):
    """Hub-layout folders of the first rows of every built-in dataset, made from the package copy."""
    n = 40
    rows = {(name, split): builtin_rows(name, split)[0] for name, split in [
        ("wikitext2", "validation"), ("wikitext2", "test"), ("gsm8k", "train"), ("gsm8k", "test"),
        ("arc_easy", "train"), ("arc_easy", "validation"), ("arc_easy", "test"), ("mmlu", "dev"),
        ("mmlu", "test"), ("mbpp", "test")]}
    mbpp = store.split_rows("mbpp", "calib", "mbpp/full.jsonl")[0]
    folders = {
        "wikitext2": {"wikitext-2-raw-v1": {s: [{"text": t} for t in rows["wikitext2", s][:200]]
                                            for s in ("validation", "test")}},
        "gsm8k": {"main": {s: rows["gsm8k", s][:n] for s in ("train", "test")}},
        "arc_easy": {"ARC-Easy": {s: [_arc_to_hub(r) for r in rows["arc_easy", s][:n]]
                                  for s in ("train", "validation", "test")}},
        "mmlu": {"all": {s: rows["mmlu", s][:n] for s in ("dev", "test")}},
        "mbpp": {"full": {"prompt": mbpp[:10], "test": mbpp[10:30], "validation": mbpp[510:520],
                          "train": mbpp[600:610]}},
    }
    for name, configs in folders.items():
        path = _hub_folder(tmp_path / "hub" / name, configs, MBPP_FEATURES if name == "mbpp" else ())
        monkeypatch.setitem(store.HUB, name, store.HubDataset(str(path), *list(configs), store.HUB[name].splits,
                                                               store.HUB[name].convert))
    monkeypatch.setattr(store, "_HUB_CACHE", {})
    monkeypatch.setenv("TASA_DATA_SOURCE", "hub")
    return rows, n


def test_hub_source_gives_the_package_rows(hub_mirror):
    rows, n = hub_mirror
    assert store.fingerprint() == "hub"
    for name, split in [("gsm8k", "train"), ("arc_easy", "test"), ("arc_easy", "validation"), ("mmlu", "dev")]:
        got, where = builtin_rows(name, split)
        assert where.startswith("hf:") and got == rows[name, split][:n], (name, split)
    assert builtin_rows("wikitext2", "test")[0] == rows["wikitext2", "test"][:200]
    # MBPP calibration: prompt + validation + train tasks, never the test tasks
    from tasa.data.sources import format_mbpp

    full = store.split_rows("mbpp", "calib", "mbpp/full.jsonl")[0]
    assert [r["task_id"] for r in full] == [*range(1, 31), *range(511, 521), *range(601, 611)]
    assert [r["task_id"] for r in builtin_rows("mbpp", "calib")[0]] == [*range(1, 11), *range(511, 521),
                                                                       *range(601, 611)]
    assert resolve_calibration_source("mbpp").load() == [format_mbpp(r) for r in full
                                                         if not 11 <= r["task_id"] <= 510]


def test_hub_source_serves_tasks_and_calibration(hub_mirror):
    from tasa.eval.tasks import get_task

    rows, n = hub_mirror
    task = get_task("arc_easy")
    docs = task.select(5)
    assert [d["id"] for d in docs] == [r["id"] for r in rows["arc_easy", "test"][:5]]
    assert task.contexts(docs[:1], 3)[0].count("Question:") == 4  # few-shot rows from the hub's train split
    texts = resolve_calibration_source("gsm8k").load()
    assert len(texts) == n and texts[0].startswith("Question: " + rows["gsm8k", "train"][0]["question"])


def test_hf_calibration_source_and_task_data_from_a_hub_folder(tmp_path, package_data, tokenizer):
    from tasa.config import CalibSpec
    from tasa.data import build_calibration
    from tasa.eval.tasks import load_task_spec

    folder = _hub_folder(tmp_path / "corpus", {"prose": {"train": [{"text": f"line {i} " * 30} for i in range(40)]},
                                               "qa": {"test": [{"q": f"q{i}", "a": f"a{i}"} for i in range(5)]}})
    src = resolve_calibration_source(f"hf:{folder}?split=train&field=text&config=prose")
    assert src.load()[3] == "line 3 " * 30
    cal = build_calibration(tokenizer, CalibSpec.parse(f"hf:{folder}?split=train&field=text&config=prose",
                                                       nsamples=4, seqlen=32))
    assert cal.input_ids.shape == (4, 32)
    with pytest.raises(TasaError, match="has no field 'body'"):
        resolve_calibration_source(f"hf:{folder}?split=train&field=body&config=prose").load()
    with pytest.raises(TasaError, match="unknown parameter"):
        resolve_calibration_source(f"hf:{folder}?split=train&field=text&revision=x")
    spec = tmp_path / "qa.yaml"
    spec.write_text(f"kind: gold_nll\ndata: hf:{folder}?split=test&config=qa\nprompt: '{{q}}'\ntarget: '{{a}}'\n")
    task = load_task_spec(spec)
    assert [task.doc_to_target(d) for d in task.select(3)] == ["a0", "a1", "a2"]


def test_hub_offline_is_one_error_line_naming_the_dataset(tmp_path):
    """The real hub ids, offline: one `tasa: error:` line naming the dataset, exit 2, before any model load."""
    env = {"PATH": "", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "tasa", "eval", "--data-source", "hub", "--model", "unused",
                           "--tasks", "gsm8k", "--limit", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("tasa: error: could not load hub dataset openai/gsm8k (main) split test")
    assert "Traceback" not in proc.stderr


def test_plain_dir_writes_the_verified_original_bytes(package_data, tmp_path):
    root = store.plain_dir(tmp_path)
    for rel, e in store.manifest()["files"].items():
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == e["sha256"], rel
    assert store.plain_dir(tmp_path) == root  # written once, reused
