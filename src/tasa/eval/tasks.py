"""Task definitions: documents, prompts, few-shot contexts, gold answers.

Built-in tasks reproduce lm-eval 0.4.x's default tasks of the same names
(prompt, target delimiter " ", few-shot delimiter "\\n\\n", few-shot sampling):

- ``arc_easy``, ``arc_challenge``: ``"Question: {question}\\nAnswer:"``, choices
  are the answer texts; few-shot examples drawn from the train split with
  ``random.Random(1234).sample`` per document, in document order (lm-eval's
  default sampler and seed).
- ``mmlu``: the 57 subjects, each with its description line
  ``"The following are multiple choice questions (with answers) about {subject}.\\n\\n"``,
  lettered choices and continuations " A".." D"; few-shot examples are the
  first k dev rows of the same subject.  ``--limit N`` takes the first N rows
  *of each subject*, like lm-eval's per-subtask limit.
- ``gsm8k``: ``"Question: {question}\\nAnswer:"``, 5-shot by default from the
  train split (random sampler, seed 1234), generation until ``Question:``,
  ``</s>``, ``<|im_end|>`` or EOS, at most 256 new tokens.

User tasks come from a small spec file; see ``docs/TASKS.md`` and
:func:`load_task_spec`.

Rows that lack a field a task needs are skipped with one warning giving their
count and the first bad row number; a line that is not valid JSON stops with
its line number.  ``--limit`` above the number of rows is an error.
"""
from __future__ import annotations

import json
import logging
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tasa.data.sources import arc_doc, builtin_rows, read_jsonl
from tasa.data.store import hub_rows, parse_hf
from tasa.errors import TasaError

log = logging.getLogger(__name__)

FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed
KINDS = ("multiple_choice", "generation", "gold_nll")


@dataclass
class Task:
    """A task: how to load its documents and turn each into a prompt and a gold answer."""

    name: str
    kind: str  # multiple_choice | generation | gold_nll
    docs: Callable[[], list[dict]]  # evaluation documents, in order
    doc_to_text: Callable[[dict], str]
    doc_to_target: Callable[[dict], str]  # gold text: few-shot answers and the gold-NLL continuation
    doc_to_choices: Callable[[dict], list[str]] | None = None  # multiple choice
    doc_to_gold: Callable[[dict], int] | None = None  # multiple choice: index of the right choice
    doc_to_answer: Callable[[dict], str] | None = None  # generation: reference the extracted answer must match
    fewshot_docs: Callable[[], list[dict]] | None = None
    fewshot_sampler: str = "random"  # random | first_n
    fewshot_from_eval: bool = False  # few-shot pool is the evaluation split: never show a document itself
    group_key: Callable[[dict], str] | None = None  # per-group few-shot pools and limits (MMLU subjects)
    description: Callable[[dict], str] | None = None
    num_fewshot: int = 0
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    until: tuple[str, ...] = ()
    max_new_tokens: int = 256
    answer_patterns: dict = field(default_factory=dict)  # metric -> (regex, group_select)
    answer_ignore: tuple[str, ...] = ()  # regexes removed before comparing answers

    def select(self, limit: int | None, flag: str = "--limit") -> list[dict]:
        """The evaluation documents, the first ``limit`` of them (per group where the task has groups)."""
        docs = self.docs()
        if not docs:
            raise TasaError(f"task {self.name} has no usable rows")
        if limit is None:
            return docs
        if limit < 1:
            raise TasaError(f"{flag} must be positive, got {limit}")
        if self.group_key is None:
            if limit > len(docs):
                raise TasaError(f"{flag} {limit} exceeds the {len(docs)} rows of {self.name}")
            return docs[:limit]
        groups: dict[str, list[dict]] = {}
        for d in docs:
            groups.setdefault(self.group_key(d), []).append(d)
        largest = max(len(g) for g in groups.values())
        if limit > largest:
            raise TasaError(f"{flag} {limit} exceeds the rows of every {self.name} group (largest: {largest})")
        return [d for g in groups.values() for d in g[:limit]]

    def contexts(self, docs: list[dict], num_fewshot: int | None = None, seed: int = FEWSHOT_SEED) -> list[str]:
        """Prompt of each document: description, k worked examples, then the document's question."""
        k = self.num_fewshot if num_fewshot is None else num_fewshot
        if k < 0:
            raise TasaError(f"--num-fewshot must be >= 0, got {k}")
        pools: dict = {}
        if k > 0:
            if self.fewshot_docs is None:
                raise TasaError(f"task {self.name} has no few-shot examples; use --num-fewshot 0")
            for d in self.fewshot_docs():
                pools.setdefault(self.group_key(d) if self.group_key else None, []).append(d)
        rng = random.Random(seed)
        out = []
        for doc in docs:
            prefix = self.description(doc) if self.description else ""
            if k > 0:
                pool = pools.get(self.group_key(doc) if self.group_key else None, [])
                shots = self._sample(pool, k, doc, rng)
                for shot in shots:
                    prefix += self.doc_to_text(shot) + self.target_delimiter + self._shot_answer(shot)
                    prefix += self.fewshot_delimiter
            out.append(prefix + self.doc_to_text(doc))
        return out

    def _shot_answer(self, doc: dict) -> str:
        if self.kind == "multiple_choice":
            return self.doc_to_choices(doc)[self.doc_to_gold(doc)]
        return self.doc_to_target(doc)

    def _sample(self, pool: list[dict], k: int, doc: dict, rng: random.Random) -> list[dict]:
        if self.fewshot_sampler == "first_n":
            if self.fewshot_from_eval:
                pool = [d for d in pool if d != doc]
            if k > len(pool):
                raise TasaError(f"{self.name}: {k}-shot needs {k} examples, the few-shot pool has {len(pool)}")
            return pool[:k]
        need = k + 1 if self.fewshot_from_eval else k
        if need > len(pool):
            raise TasaError(f"{self.name}: {k}-shot needs {k} examples, the few-shot pool has {len(pool)}")
        picked = rng.sample(pool, need)
        return [d for d in picked if d != doc][:k] if self.fewshot_from_eval else picked


# ---- built-in tasks ----

def _convert(where: str, rows: list[dict], convert: Callable[[dict], dict], what: str) -> list[dict]:
    """Convert raw rows into documents; rows lacking fields are skipped with one warning."""
    docs, bad = [], []
    for i, row in enumerate(rows):
        try:
            docs.append(convert(row))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):
            bad.append(i + 1)
    if bad:
        log.warning("%s: skipped %d malformed %s row(s), first at row %d", where, len(bad), what, bad[0])
    return docs


def mmlu_doc(row: dict) -> dict:
    choices = [str(c) for c in row["choices"]]
    if len(choices) != 4 or not 0 <= int(row["answer"]) < 4:
        raise ValueError("MMLU rows have 4 choices")
    return {"question": str(row["question"]), "subject": str(row["subject"]), "choices": choices,
            "gold": int(row["answer"])}


def gsm8k_doc(row: dict) -> dict:
    return {"question": str(row["question"]), "answer": str(row["answer"])}


def row_docs(rows: Callable[[], tuple[list[dict], str]], convert: Callable[[dict], dict],
             what: str) -> Callable[[], list[dict]]:
    """A loader of documents converted from ``rows()`` (rows, where), read once on first use."""
    cache: list = []

    def load() -> list[dict]:
        if not cache:
            raw, where = rows()
            cache.append(_convert(where, raw, convert, what))
        return cache[0]

    return load


def _loader(name: str, split: str, convert: Callable[[dict], dict]) -> Callable[[], list[dict]]:
    return row_docs(lambda: builtin_rows(name, split), convert, name)


def data_rows(ref: str | Path) -> Callable[[], tuple[list[dict], str]]:
    """Rows of a task's data: a local JSON-lines file, or ``hf:DATASET?split=S[&config=C]``."""
    ref = str(ref)
    if ref.startswith("hf:"):
        dataset, params = parse_hf(ref)
        unknown = sorted(set(params) - {"split", "config"})
        if not dataset or unknown:
            raise TasaError(f"hub data {ref!r}: write hf:DATASET?split=SPLIT[&config=NAME]")
        return lambda: (hub_rows(dataset, params.get("config"), params.get("split", "test")), ref)
    path = Path(ref)
    return lambda: (read_jsonl(path), str(path))


def _arc(name: str) -> Task:
    return Task(name=name, kind="multiple_choice", docs=_loader(name, "test", arc_doc),
                doc_to_text=lambda d: f"Question: {d['question']}\nAnswer:",
                doc_to_target=lambda d: d["choices"][d["gold"]], doc_to_choices=lambda d: d["choices"],
                doc_to_gold=lambda d: d["gold"], fewshot_docs=_loader(name, "train", arc_doc))


def _mmlu_text(d: dict) -> str:
    c = d["choices"]
    return f"{d['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


def _mmlu() -> Task:
    return Task(name="mmlu", kind="multiple_choice", docs=_loader("mmlu", "test", mmlu_doc),
                doc_to_text=_mmlu_text, doc_to_target=lambda d: "ABCD"[d["gold"]],
                doc_to_choices=lambda d: ["A", "B", "C", "D"], doc_to_gold=lambda d: d["gold"],
                fewshot_docs=_loader("mmlu", "dev", mmlu_doc), fewshot_sampler="first_n",
                group_key=lambda d: d["subject"],
                description=lambda d: "The following are multiple choice questions (with answers) about "
                                      f"{d['subject'].replace('_', ' ')}.\n\n")


GSM8K_STRICT = r"#### (\-?[0-9\.\,]+)"
GSM8K_FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
GSM8K_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")


def _gsm8k() -> Task:
    return Task(name="gsm8k", kind="generation", docs=_loader("gsm8k", "test", gsm8k_doc),
                doc_to_text=lambda d: f"Question: {d['question']}\nAnswer:", doc_to_target=lambda d: d["answer"],
                doc_to_answer=lambda d: d["answer"], fewshot_docs=_loader("gsm8k", "train", gsm8k_doc),
                num_fewshot=5, until=("Question:", "</s>", "<|im_end|>"), max_new_tokens=256,
                answer_patterns={"strict_match": (GSM8K_STRICT, 0), "flexible_extract": (GSM8K_FLEXIBLE, -1)},
                answer_ignore=GSM8K_IGNORE)


BUILTIN_TASKS: dict[str, Callable[[], Task]] = {
    "arc_easy": lambda: _arc("arc_easy"),
    "arc_challenge": lambda: _arc("arc_challenge"),
    "mmlu": _mmlu,
    "gsm8k": _gsm8k,
}
PERPLEXITY_TASKS = ("wikitext2",)


def task_names() -> list[str]:
    return [*PERPLEXITY_TASKS, *BUILTIN_TASKS]


def get_task(name: str) -> Task:
    """A built-in task by name, or a user task from a ``.json``/``.yaml`` spec file."""
    if name in BUILTIN_TASKS:
        return BUILTIN_TASKS[name]()
    if name.endswith((".json", ".yaml", ".yml")):
        return load_task_spec(name)
    raise TasaError(f"unknown task {name!r}; built-in: {', '.join(task_names())}, or a task spec .yaml/.json file")


# ---- user-defined tasks ----

SPEC_KEYS = {"name", "kind", "data", "fewshot_data", "num_fewshot", "fewshot_sampler", "description", "prompt",
             "choices", "answer", "target", "answer_regex", "until", "max_new_tokens", "target_delimiter",
             "fewshot_delimiter"}


def _template(tmpl: str, what: str) -> Callable[[dict], str]:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(tmpl) if f is not None]
    except ValueError as e:
        raise TasaError(f"bad {what} template {tmpl!r}: {e}") from None
    if any(f == "" or f.isdigit() for f in fields):
        raise TasaError(f"{what} template {tmpl!r} must name row fields, e.g. {{question}}")
    return lambda row: tmpl.format(**row)


def _choice_index(value, choices: list[str]) -> int:
    if isinstance(value, bool):
        raise ValueError("boolean answer")
    if isinstance(value, int):
        if not 0 <= value < len(choices):
            raise ValueError("answer index out of range")
        return value
    value = str(value)
    if value in choices:
        return choices.index(value)
    if len(value) == 1 and value.upper() in string.ascii_uppercase[: len(choices)]:
        return string.ascii_uppercase.index(value.upper())
    if value.isdigit() and 0 <= int(value) < len(choices):
        return int(value)
    raise ValueError(f"answer {value!r} is neither a choice, a letter nor an index")


def load_task_spec(path: str | Path) -> Task:
    """A user task from a JSON or YAML spec; see docs/TASKS.md for the format."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TasaError(f"task spec not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            spec = json.loads(text)
        else:
            import yaml

            spec = yaml.safe_load(text)
    except Exception as e:  # json and yaml raise different types
        raise TasaError(f"{path}: not valid {path.suffix[1:].upper()} ({type(e).__name__})") from None
    if not isinstance(spec, dict):
        raise TasaError(f"{path}: a task spec is a mapping of keys to values")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise TasaError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(SPEC_KEYS))}")
    for key in ("kind", "data", "prompt"):
        if key not in spec:
            raise TasaError(f"{path}: missing required key '{key}'")
    kind = spec["kind"]
    if kind not in KINDS:
        raise TasaError(f"{path}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    name = str(spec.get("name") or path.stem)
    data = _data_ref(path, spec["data"])
    fewshot = _data_ref(path, spec["fewshot_data"]) if spec.get("fewshot_data") else None
    prompt = _template(str(spec["prompt"]), "prompt")
    target = _template(str(spec["target"]), "target") if spec.get("target") else None

    if kind == "multiple_choice":
        if "choices" not in spec or "answer" not in spec:
            raise TasaError(f"{path}: a multiple_choice task needs 'choices' (field with the list of choices) "
                            "and 'answer' (field with the right choice: index, letter or text)")
        cfield, afield = spec["choices"], spec["answer"]

        def convert(row: dict) -> dict:
            choices = row[cfield]
            if not isinstance(choices, list) or len(choices) < 2:
                raise ValueError("choices must be a list of at least 2")
            choices = [str(c) for c in choices]
            return {**row, "_text": prompt(row), "_choices": choices, "_gold": _choice_index(row[afield], choices)}
    elif kind == "generation":
        if "answer" not in spec or "answer_regex" not in spec:
            raise TasaError(f"{path}: a generation task needs 'answer' (field with the reference answer) and "
                            "'answer_regex' (regex whose first group extracts the model's answer)")
        afield = spec["answer"]

        def convert(row: dict) -> dict:
            return {**row, "_text": prompt(row), "_answer": str(row[afield]),
                    "_target": target(row) if target else None}
    else:
        if target is None:
            raise TasaError(f"{path}: a gold_nll task needs 'target' (template of the gold text)")

        def convert(row: dict) -> dict:
            return {**row, "_text": prompt(row), "_target": target(row)}

    def loader(ref: str | Path) -> Callable[[], list[dict]]:
        return row_docs(data_rows(ref), convert, name)

    num_fewshot = int(spec.get("num_fewshot", 0))
    task = Task(name=name, kind=kind, docs=loader(data), doc_to_text=lambda d: d["_text"],
                doc_to_target=lambda d: d["_target"] if d.get("_target") is not None else "",
                num_fewshot=num_fewshot, fewshot_sampler=str(spec.get("fewshot_sampler", "random")),
                description=(lambda d, s=str(spec["description"]): s) if spec.get("description") else None,
                target_delimiter=str(spec.get("target_delimiter", " ")),
                fewshot_delimiter=str(spec.get("fewshot_delimiter", "\n\n")))
    if task.fewshot_sampler not in ("random", "first_n"):
        raise TasaError(f"{path}: fewshot_sampler must be random or first_n")
    if fewshot:  # also the probe rows of a zero-shot task (tasa profile)
        task.fewshot_docs = loader(fewshot)
    elif num_fewshot > 0:
        task.fewshot_docs, task.fewshot_from_eval = task.docs, True
    if kind == "multiple_choice":
        task.doc_to_choices = lambda d: d["_choices"]
        task.doc_to_gold = lambda d: d["_gold"]
        task.doc_to_target = lambda d: d["_choices"][d["_gold"]]
    elif kind == "generation":
        task.doc_to_answer = lambda d: d["_answer"]
        task.until = tuple(spec.get("until", ("\n\n",)))
        task.max_new_tokens = int(spec.get("max_new_tokens", 256))
        try:
            compiled = re.compile(spec["answer_regex"])
        except Exception as e:
            raise TasaError(f"{path}: bad answer_regex ({e})") from None
        task.answer_patterns = {"exact_match": (compiled.pattern, 0)}
        task.answer_ignore = (",", r"\$", r"\.$")
        if num_fewshot > 0 and target is None:
            raise TasaError(f"{path}: few-shot generation needs 'target' (template of a worked answer)")
    if isinstance(data, Path) and not data.is_file():
        raise TasaError(f"{path}: data file not found: {data}")
    if isinstance(fewshot, Path) and not fewshot.is_file():
        raise TasaError(f"{path}: few-shot data file not found: {fewshot}")
    return task


def _data_ref(spec_path: Path, value) -> str | Path:
    """A spec's data entry: ``hf:...`` as it is, else a file path relative to the spec."""
    value = str(value)
    return value if value.startswith("hf:") else (spec_path.parent / value).resolve()
