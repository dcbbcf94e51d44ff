"""Probe objectives: token sequences from calibration-side splits and how to score them.

Each objective is a set of right-padded sequences with a mask of the positions
whose token is scored, grouped into items:

- ``nll`` objectives (``wikitext2``: validation windows; ``gsm8k``: train rows as
  ``Question: ...\\nAnswer: <gold solution>``, only solution tokens scored; a
  ``gold_nll`` or ``generation`` user task with ``target``): the cost is the
  per-token negative log-likelihood, total NLL / total scored tokens;
- ``choice`` objectives (``arc_easy``, ``arc_challenge``: train + validation;
  ``mmlu``: dev; multiple-choice user tasks with ``fewshot_data``): one sequence
  per choice, the prompt of lm-eval's task followed by the choice; the cost is
  the mean over items of -log softmax(choice log-likelihoods)[gold], a smooth
  stand-in for accuracy that rewards both the gold log-likelihood and its margin.

Probe rows never come from an evaluation split, so profiles cannot leak into
final tables.  Rows are taken in a seeded random order until the objective
holds ``min_tokens`` scored tokens.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from tasa.data.sources import BUILTIN, data_dir, wikitext_rows
from tasa.errors import TasaError
from tasa.eval.lm import encode_pair
from tasa.eval.tasks import Task, arc_doc, gsm8k_doc, jsonl_docs, mmlu_doc, get_task

PROBE_SPLITS = {"gsm8k": ("train",), "arc_easy": ("train", "validation"),
                "arc_challenge": ("train", "validation"), "mmlu": ("dev",)}
_CONVERT = {"gsm8k": gsm8k_doc, "arc_easy": arc_doc, "arc_challenge": arc_doc, "mmlu": mmlu_doc}


@dataclass
class Objective:
    """Sequences of one objective: ids (N, T) right-padded, scored-position mask, item and choice per row."""

    name: str
    kind: str  # "nll" or "choice"
    input_ids: torch.Tensor  # (N, T)
    score_mask: torch.Tensor  # (N, T) bool: token t is scored (predicted from position t-1)
    item: torch.Tensor  # (N,) item index of each row
    choice: torch.Tensor  # (N,) choice index (0 for nll rows)
    gold: torch.Tensor  # (n_items,) gold choice (0 for nll items)

    @property
    def n_items(self) -> int:
        return int(self.gold.numel())

    @property
    def scored_tokens(self) -> int:
        return int(self.score_mask.sum())


def _pack(rows: list[tuple[list[int], int]], items: list[int], choices: list[int], gold: list[int], name: str,
          kind: str) -> Objective:
    """rows: (token ids, index of the first scored token)."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, (ids, first) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        mask[r, max(first, 1): len(ids)] = True
    return Objective(name, kind, input_ids, mask, torch.tensor(items), torch.tensor(choices), torch.tensor(gold))


def _probe_docs(task: Task, name: str) -> list[dict]:
    if name in PROBE_SPLITS:
        docs = []
        for split in PROBE_SPLITS[name]:
            docs += jsonl_docs(lambda s=split: data_dir() / BUILTIN[name].files[s], _CONVERT[name], name)()
        return docs
    if task.fewshot_docs is None or task.fewshot_from_eval:
        raise TasaError(f"user task {name}: profiling needs probe rows apart from the evaluation rows; "
                        "give the spec a 'fewshot_data' file")
    return task.fewshot_docs()


def build_objective(name: str, tokenizer, min_tokens: int = 4096, seqlen: int = 512, seed: int = 0,
                    max_length: int | None = None) -> Objective:
    """Probe sequences of objective ``name`` (a built-in task or a task spec file) with >= ``min_tokens`` scored."""
    if min_tokens < 1:
        raise TasaError(f"probe tokens must be positive, got {min_tokens}")
    if name == "wikitext2":
        text = "\n\n".join(wikitext_rows(data_dir() / BUILTIN["wikitext2"].files["validation"]))
        ids = tokenizer(text, add_special_tokens=False).input_ids
        n = -(-min_tokens // (seqlen - 1))
        if n * seqlen > len(ids):
            raise TasaError(f"wikitext2 validation holds {len(ids)} tokens, fewer than {n} windows of {seqlen}")
        starts = sorted(random.Random(seed).sample(range(len(ids) // seqlen), n))
        rows = [(ids[s * seqlen:(s + 1) * seqlen], 1) for s in starts]
        return _pack(rows, list(range(n)), [0] * n, [0] * n, name, "nll")
    task = get_task(name)
    docs = _probe_docs(task, name)
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    rows, items, choices, gold = [], [], [], []
    scored = 0
    for i in order:
        doc = docs[i]
        context = task.contexts([doc], 0)[0]
        if task.kind == "multiple_choice":
            conts = [task.target_delimiter + c for c in task.doc_to_choices(doc)]
            gold.append(task.doc_to_gold(doc))
        else:
            target = task.doc_to_target(doc)
            if not target:
                raise TasaError(f"task {name} has no gold text to score; give its spec a 'target'")
            conts = [task.target_delimiter + target]
            gold.append(0)
        for c, cont in enumerate(conts):
            ctx_ids, cont_ids = encode_pair(tokenizer, context, cont)
            whole = ctx_ids + cont_ids
            if max_length is not None and len(whole) > max_length:
                whole = whole[-max_length:]
            rows.append((whole, len(whole) - len(cont_ids)))
            items.append(len(gold) - 1)
            choices.append(c)
            scored += len(cont_ids)
        if scored >= min_tokens:
            break
    if scored < min_tokens:
        raise TasaError(f"{name}: its probe rows hold only {scored} scored tokens, fewer than {min_tokens}")
    return _pack(rows, items, choices, gold, name, "choice" if task.kind == "multiple_choice" else "nll")


@dataclass
class ItemLosses:
    """Per-item raw material of an objective's cost: NLL sums and token counts, or choice log-likelihoods."""

    nll: torch.Tensor  # (n_items,) summed NLL (nll kind) or -log p(gold | choices) (choice kind)
    tokens: torch.Tensor  # (n_items,) scored tokens (nll kind) or ones (choice kind)

    def cost(self) -> float:
        return float(self.nll.sum() / self.tokens.sum())


def item_losses(objective: Objective, row_nll: torch.Tensor) -> ItemLosses:
    """Combine per-row summed NLL (N,) into per-item losses."""
    n = objective.n_items
    if objective.kind == "nll":
        nll = torch.zeros(n, dtype=torch.float64).index_add_(0, objective.item, row_nll.double())
        tokens = torch.zeros(n, dtype=torch.float64).index_add_(0, objective.item,
                                                                objective.score_mask.sum(1).double())
        return ItemLosses(nll, tokens)
    lls = torch.full((n, int(objective.choice.max()) + 1), float("-inf"), dtype=torch.float64)
    lls[objective.item, objective.choice] = -row_nll.double()
    logp = torch.log_softmax(lls, dim=1)
    return ItemLosses(-logp[torch.arange(n), objective.gold], torch.ones(n, dtype=torch.float64))
