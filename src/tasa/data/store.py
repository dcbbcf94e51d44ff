"""Where the built-in datasets' rows come from.

Three places, one interface (:func:`split_rows`):

- ``package`` (the default): the copies shipped inside tasa, ``tasa/data/builtin/<dataset>/<split>.<ext>.xz``,
  listed in ``MANIFEST.json`` with the sha256 of their original bytes, row counts, sources and
  licences.  Every file is checked against its sha256 when it is first read in a process; a damaged
  copy is refused with one line, never read.
- ``$TASA_DATA_DIR``: a user override for the package copy, a folder with the same layout
  uncompressed (``wikitext2/validation.txt``, ``gsm8k/train.jsonl``, ...).
- ``hub`` (``--data-source hub`` or ``$TASA_DATA_SOURCE=hub``): the usual Hugging Face hub ids of
  the same datasets (those lm-eval uses), through the ``datasets`` library and its cache, with
  each row converted to the layout of the package copy, so everything downstream is the same.

Any other hub dataset is named directly as ``hf:DATASET?split=...`` (see :func:`hub_rows`).
"""
from __future__ import annotations

import hashlib
import json
import lzma
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs

from tasa.errors import TasaError

PACKAGE_DIR = Path(__file__).resolve().parent / "builtin"
SOURCES = ("package", "hub")


def read_jsonl_text(text: str, where: str) -> list[dict]:
    """Rows of JSON-lines text; a malformed line fails naming ``where`` and its line number."""
    rows = []
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): strings may hold U+2028
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise TasaError(f"{where}:{lineno}: malformed JSON ({e.msg})") from None
    return rows


def wikitext_rows_text(text: str) -> list[str]:
    """Hugging Face `wikitext` rows of a raw file: non-blank lines keep their newline, blank ones are ''."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line + "\n" if line.strip() else "" for line in lines]


def data_source() -> str:
    """``package`` or ``hub``, from ``$TASA_DATA_SOURCE`` (default package)."""
    source = os.environ.get("TASA_DATA_SOURCE", "package") or "package"
    if source not in SOURCES:
        raise TasaError(f"TASA_DATA_SOURCE must be {' or '.join(SOURCES)}, got {source!r}")
    return source


def override_dir() -> Path | None:
    """``$TASA_DATA_DIR`` when set (it must be a directory), else None."""
    env = os.environ.get("TASA_DATA_DIR")
    if not env:
        return None
    path = Path(env).expanduser()
    if not path.is_dir():
        raise TasaError(f"TASA_DATA_DIR={env} is not a directory")
    return path


def manifest() -> dict:
    path = PACKAGE_DIR / "MANIFEST.json"
    if not path.is_file():
        raise TasaError(f"tasa's built-in data are missing ({path}); reinstall tasa")
    return json.loads(path.read_text())


def fingerprint() -> str:
    """What the built-in rows are read from, for stage keys and records."""
    if data_source() == "hub":
        return "hub"
    override = override_dir()
    if override is not None:
        return f"dir:{override.resolve()}"
    return "package:" + hashlib.sha256((PACKAGE_DIR / "MANIFEST.json").read_bytes()).hexdigest()[:16]


_VERIFIED: dict[str, str] = {}  # file -> text, verified once per process


def package_text(rel: str) -> str:
    """The original text of a packaged file, checked against the manifest's sha256."""
    if rel in _VERIFIED:
        return _VERIFIED[rel]
    entry = manifest()["files"].get(rel)
    path = PACKAGE_DIR / f"{rel}.xz"
    if entry is None or not path.is_file():
        raise TasaError(f"tasa's built-in data have no {rel}; reinstall tasa")
    try:
        data = lzma.decompress(path.read_bytes())
    except lzma.LZMAError:
        raise TasaError(f"built-in data file {path} is damaged (not valid xz); reinstall tasa") from None
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise TasaError(f"built-in data file {path} is damaged (sha256 differs from MANIFEST.json); reinstall tasa")
    _VERIFIED[rel] = data.decode("utf-8")
    return _VERIFIED[rel]


def override_file(rel: str) -> Path | None:
    """The ``$TASA_DATA_DIR`` file standing in for built-in file ``rel`` (it must exist), or None without one."""
    override = override_dir()
    if override is None:
        return None
    path = override / rel
    if not path.is_file():
        raise TasaError(f"data file not found: {path} (TASA_DATA_DIR overrides the built-in data)")
    return path


def file_text(rel: str) -> tuple[str, str]:
    """(text, where) of a built-in file: from ``$TASA_DATA_DIR`` when set, else the package copy."""
    path = override_file(rel)
    if path is None:
        return package_text(rel), f"tasa:{rel}"
    return path.read_text(encoding="utf-8"), str(path)


def plain_dir(cache: Path) -> Path:
    """A folder of the built-in files, uncompressed, for tools that read files (e.g. lm-eval task YAMLs).

    ``$TASA_DATA_DIR`` when set; else the package copy written (verified, once) under ``cache``."""
    override = override_dir()
    if override is not None:
        return override
    root = cache / "data" / fingerprint().replace(":", "-")
    for rel in manifest()["files"]:
        path = root / rel
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(package_text(rel), encoding="utf-8", newline="")
            os.replace(tmp, path)
    return root


# ---- the hub ----

_HUB_CACHE: dict[tuple, list[dict]] = {}


def parse_hf(ref: str) -> tuple[str, dict[str, str]]:
    """(dataset, parameters) of ``hf:DATASET?key=value&...`` (the last value of a repeated key wins)."""
    dataset, _, query = ref[len("hf:"):].partition("?")
    return dataset, {k: v[-1] for k, v in parse_qs(query).items()}


def hub_rows(dataset: str, config: str | None, split: str) -> list[dict]:
    """Rows of a hub dataset split (a hub id, or a local folder in the hub's layout) via ``datasets``.

    ``datasets`` caches downloads (``$HF_DATASETS_CACHE``); offline or unknown datasets fail with one
    line naming the dataset."""
    key = (dataset, config, split)
    if key in _HUB_CACHE:
        return _HUB_CACHE[key]
    try:
        import datasets
    except ImportError:
        raise TasaError("hub datasets need the 'datasets' package: pip install 'tasa[hub]'") from None
    name = dataset + (f" ({config})" if config else "") + f" split {split}"
    try:
        ds = datasets.load_dataset(dataset, config, split=split)
    except Exception as e:  # network, hub and builder errors come in many types
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        offline = isinstance(e, (ConnectionError, TimeoutError)) or "Offline" in msg
        raise TasaError(f"could not load hub dataset {name}: {type(e).__name__}{': ' + msg if msg else ''}"
                        + (" (offline? the hub is needed once, then its cache serves)" if offline else "")) from None
    _HUB_CACHE[key] = ds.to_list()
    return _HUB_CACHE[key]


def _arc_from_hub(row: dict) -> dict:
    """allenai/ai2_arc rows to the original ARC layout (``question.stem``, ``question.choices``)."""
    c = row["choices"]
    return {"id": row["id"], "question": {"stem": row["question"],
                                          "choices": [{"text": t, "label": l} for t, l in zip(c["text"], c["label"])]},
            "answerKey": row["answerKey"]}


def _wikitext_from_hub(row: dict) -> str:
    return row["text"]


@dataclass(frozen=True)
class HubDataset:
    """A built-in dataset on the hub: id, config, the hub splits making each local split, a row converter."""

    dataset: str
    config: str | None
    splits: dict  # local split -> tuple of hub splits, concatenated in order
    convert: Callable[[dict], object] | None = None


_ARC_SPLITS = {"train": ("train",), "validation": ("validation",), "test": ("test",)}
HUB: dict[str, HubDataset] = {
    "wikitext2": HubDataset("Salesforce/wikitext", "wikitext-2-raw-v1",
                            {"validation": ("validation",), "test": ("test",)}, _wikitext_from_hub),
    "gsm8k": HubDataset("openai/gsm8k", "main", {"train": ("train",), "test": ("test",)}),
    "arc_easy": HubDataset("allenai/ai2_arc", "ARC-Easy", _ARC_SPLITS, _arc_from_hub),
    "arc_challenge": HubDataset("allenai/ai2_arc", "ARC-Challenge", _ARC_SPLITS, _arc_from_hub),
    "mmlu": HubDataset("cais/mmlu", "all", {"dev": ("dev",), "test": ("test",)}),
    # tasa's MBPP calibration split is the "full" file, every task in task_id order: prompt 1-10,
    # test 11-510, validation 511-600, train 601-974 (tasa.data.sources drops the test tasks).
    "mbpp": HubDataset("google-research-datasets/mbpp", "full",
                       {"calib": ("prompt", "test", "validation", "train"), "test": ("test",)}),
}


def split_rows(name: str, split: str, rel: str) -> tuple[list, str]:
    """(rows, where) of built-in dataset ``name``'s ``split`` (file ``rel`` in the package layout).

    Rows are dicts in the package copy's layout, or for WikiText-2 the Hugging Face line rows."""
    if data_source() == "hub":
        hub = HUB[name]
        rows: list = []
        for s in hub.splits[split]:
            rows += hub_rows(hub.dataset, hub.config, s)
        if hub.convert is not None:
            rows = [hub.convert(r) for r in rows]
        return rows, f"hf:{hub.dataset}/{hub.config}/{split}"
    text, where = file_text(rel)
    if rel.endswith(".txt"):
        return wikitext_rows_text(text), where
    return read_jsonl_text(text, where), where


def is_eval_copy(path: Path, eval_files: list[str]) -> bool:
    """Whether a user's file holds exactly the bytes of a built-in evaluation split."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    files = manifest()["files"]
    return any(files.get(rel, {}).get("sha256") == digest for rel in eval_files)
