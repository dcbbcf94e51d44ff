"""Text sources for calibration and evaluation.

Built-in datasets are read through tasa.data.store: the copies shipped inside tasa (default),
``$TASA_DATA_DIR`` (a folder with the same layout, overriding them), or the Hugging Face hub
(``--data-source hub``).  Each built-in source has *calibration* splits and one *evaluation* split;
asking to calibrate on an evaluation split is refused, so evaluation rows never leak into
calibration.

Source names (used in ``--calib``):

- ``wikitext2`` (calibration: validation, evaluation: test), ``gsm8k``,
  ``arc_easy``, ``arc_challenge``, ``mmlu``, ``mbpp``; optionally ``NAME/SPLIT``;
- a ``.txt`` file; a ``.jsonl`` file as ``FILE.jsonl#FIELD`` or
  ``FILE.jsonl#{question} {answer}`` (a template of row fields; no commas);
- ``hf:DATASET?split=train&field=text[&config=NAME]`` (any hub dataset through ``datasets``;
  DATASET may also be a local folder in the hub's layout).
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from tasa.data import store
from tasa.errors import TasaError


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSON-lines file; a malformed line fails with its line number."""
    if not path.is_file():
        raise TasaError(f"data file not found: {path}")
    return store.read_jsonl_text(path.read_text(encoding="utf-8"), str(path))


def wikitext_rows(path: Path) -> list[str]:
    """Hugging Face `wikitext` rows: non-blank lines keep their newline, blank ones are ''."""
    if not path.is_file():
        raise TasaError(f"data file not found: {path}")
    return store.wikitext_rows_text(path.read_text(encoding="utf-8"))


# ---- row formatting: task rows become "question + gold solution" text ----

def format_gsm8k(row: dict) -> str:
    return f"Question: {row['question']}\nAnswer: {row['answer']}"


def arc_doc(row: dict) -> dict:
    """An original AI2 ARC row as a document: question, choice texts and labels, gold index.

    Raises ValueError when ``answerKey`` is not among the row's labels."""
    q = row["question"]
    labels = [str(c["label"]) for c in q["choices"]]
    texts = [str(c["text"]) for c in q["choices"]]
    return {"id": row.get("id"), "question": str(q["stem"]), "choices": texts, "labels": labels,
            "gold": labels.index(str(row["answerKey"]))}


def format_arc(row: dict) -> str:
    try:
        doc = arc_doc(row)
    except ValueError:
        raise TasaError(f"ARC row {row.get('id')} has answerKey {row['answerKey']!r} not among its choices") from None
    return f"Question: {doc['question']}\nAnswer: {doc['choices'][doc['gold']]}"


def format_mmlu(row: dict) -> str:
    return f"{row['question'].strip()}\nAnswer: {row['choices'][row['answer']]}"


def format_mbpp(row: dict) -> str:
    tests = "\n".join(row.get("test_list", []))
    return f"{row['text']}\n{row['code']}\n{tests}".rstrip()


@dataclass(frozen=True)
class BuiltinSource:
    """A dataset in the data directory: files per split, which splits calibrate, which evaluates."""

    name: str
    files: dict  # split -> relative file path
    calib_splits: tuple[str, ...]
    eval_split: str
    kind: str  # "text" (one document) or "rows" (one text per row)
    formatter: Callable[[dict], str] | None = None
    row_filter: Callable[[str, dict], bool] | None = None  # (split, row) -> keep


def _mbpp_filter(split: str, row: dict) -> bool:
    # full.jsonl holds every task; the standard test split is task_id 11..510.
    return split != "calib" or not 11 <= int(row["task_id"]) <= 510


BUILTIN: dict[str, BuiltinSource] = {
    "wikitext2": BuiltinSource("wikitext2", {"validation": "wikitext2/validation.txt", "test": "wikitext2/test.txt"},
                               ("validation",), "test", "text"),
    "gsm8k": BuiltinSource("gsm8k", {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
                           ("train",), "test", "rows", format_gsm8k),
    "arc_easy": BuiltinSource("arc_easy", {"train": "arc_easy/train.jsonl", "validation": "arc_easy/validation.jsonl",
                                           "test": "arc_easy/test.jsonl"}, ("train", "validation"), "test", "rows",
                              format_arc),
    "arc_challenge": BuiltinSource("arc_challenge", {"train": "arc_challenge/train.jsonl",
                                                     "validation": "arc_challenge/validation.jsonl",
                                                     "test": "arc_challenge/test.jsonl"},
                                   ("train", "validation"), "test", "rows", format_arc),
    "mmlu": BuiltinSource("mmlu", {"dev": "mmlu/dev.jsonl", "test": "mmlu/test.jsonl"}, ("dev",), "test", "rows",
                          format_mmlu),
    "mbpp": BuiltinSource("mbpp", {"calib": "mbpp/full.jsonl", "test": "mbpp/test.jsonl"}, ("calib",), "test", "rows",
                          format_mbpp, _mbpp_filter),
}


@dataclass(frozen=True)
class TextSource:
    """A resolved source: a name and a loader returning its texts (documents or formatted rows)."""

    name: str
    kind: str  # "text" or "rows"
    load: Callable[[], list[str]]


def builtin_rows(name: str, split: str) -> tuple[list, str]:
    """(rows, where) of built-in source ``name``'s ``split``, from the configured data source."""
    src = BUILTIN[name]
    if split not in src.files:
        raise TasaError(f"{name} has no split '{split}'")
    rows, where = store.split_rows(name, split, src.files[split])
    if src.row_filter is not None:
        rows = [r for r in rows if src.row_filter(split, r)]
    return rows, where


def _builtin_split_texts(src: BuiltinSource, split: str) -> list[str]:
    rows, where = builtin_rows(src.name, split)
    if src.kind == "text":
        return ["\n\n".join(rows)]
    texts = []
    for i, row in enumerate(rows):
        try:
            texts.append(src.formatter(row))
        except (KeyError, TypeError, IndexError) as e:
            raise TasaError(f"{where}: row {i + 1} lacks the fields {src.name} needs ({e})") from None
    return texts


def eval_texts(name: str) -> list[str]:
    """Texts of a built-in source's evaluation split (never used for calibration)."""
    if name not in BUILTIN:
        raise TasaError(f"unknown dataset {name!r}; built-in: {', '.join(BUILTIN)}")
    src = BUILTIN[name]
    return _builtin_split_texts(src, src.eval_split)


def _jsonl_with_template(path: Path, selector: str) -> Callable[[], list[str]]:
    if "{" in selector:
        fields = [f for _, f, _, _ in string.Formatter().parse(selector) if f]

        def render(row: dict) -> str:
            return selector.format(**{f: row[f] for f in fields})
    else:
        def render(row: dict) -> str:
            return str(row[selector])

    def load() -> list[str]:
        out = []
        for i, row in enumerate(read_jsonl(path)):
            try:
                out.append(render(row))
            except KeyError as e:
                raise TasaError(f"{path}: row {i + 1} has no field {e}") from None
        return out

    return load


def _hub_loader(spec: str) -> Callable[[], list[str]]:
    dataset, params = store.parse_hf(spec)
    if not dataset or "field" not in params:
        raise TasaError(f"hub source {spec!r} needs a dataset and a field, e.g. hf:{dataset or 'DATASET'}?split=train&field=text")
    unknown = sorted(set(params) - {"split", "field", "config"})
    if unknown:
        raise TasaError(f"hub source {spec!r}: unknown parameter(s) {', '.join(unknown)}; use split, field, config")

    def load() -> list[str]:
        rows = store.hub_rows(dataset, params.get("config"), params.get("split", "train"))
        if rows and params["field"] not in rows[0]:
            raise TasaError(f"hub dataset {dataset} has no field {params['field']!r}; fields: {', '.join(rows[0])}")
        return [str(r[params["field"]]) for r in rows]

    return load


def resolve_calibration_source(spec: str) -> TextSource:
    """Resolve a calibration source name; refuse evaluation splits."""
    if spec.startswith("hf:"):
        return TextSource(spec, "rows", _hub_loader(spec))
    path_part, _, selector = spec.partition("#")
    path = Path(path_part).expanduser()
    if path.suffix in (".txt", ".jsonl") or path.exists():
        if not path.is_file():
            raise TasaError(f"calibration file not found: {path}")
        if _is_eval_file(path):
            raise TasaError(f"{path} is an evaluation split; calibrating on it would leak evaluation data")
        if path.suffix == ".jsonl":
            if not selector:
                raise TasaError(f"say which field of {path} to use: {path}#FIELD or {path}#{{field1}} {{field2}}")
            return TextSource(spec, "rows", _jsonl_with_template(path, selector))
        return TextSource(spec, "text", lambda: [path.read_text(encoding="utf-8")])
    name, _, split = spec.partition("/")
    if name not in BUILTIN:
        raise TasaError(f"unknown dataset {name!r}; built-in: {', '.join(BUILTIN)}, or a .txt/.jsonl file")
    src = BUILTIN[name]
    splits = (split,) if split else src.calib_splits
    for s in splits:
        if s == src.eval_split:
            raise TasaError(f"{name} split '{s}' is used for evaluation; calibrate on {'/'.join(src.calib_splits)}")
        if s not in src.files:
            raise TasaError(f"{name} has no split '{s}'; calibration splits: {', '.join(src.calib_splits)}")
        if store.data_source() == "package":
            store.override_file(src.files[s])  # a missing override file fails here, before any work

    def load() -> list[str]:
        return [t for s in splits for t in _builtin_split_texts(src, s)]

    return TextSource(name if not split else spec, src.kind, load)


def _is_eval_file(path: Path) -> bool:
    """Whether ``path`` is (or holds the bytes of) a built-in evaluation split."""
    eval_files = [s.files[s.eval_split] for s in BUILTIN.values()]
    override = store.override_dir()
    if override is not None and any(path.resolve() == (override / rel).resolve() for rel in eval_files):
        return True
    return store.is_eval_copy(path, eval_files)


def iter_builtin() -> Iterator[BuiltinSource]:
    return iter(BUILTIN.values())
