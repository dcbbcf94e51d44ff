"""Probe objectives: token sequences from calibration-side splits and how to score them.

Each objective is a set of right-padded sequences with a mask of the positions
whose token is scored, grouped into items:

- ``nll`` objectives (``wikitext2``: validation windows; ``gsm8k``: train rows as
  ``Question: ...\\nAnswer: <gold solution>``, only solution tokens scored; a
  ``gold_nll`` or ``generation`` user task with ``target``): the cost is, by
  ``token_cost``, ``kl`` (default): the mean over scored tokens of the KL
  divergence of the probe's next-token distribution from the full-precision
  model's (over the reference's top ``KL_TOPK`` tokens and one bucket for the
  rest, a lower bound of the full KL, exact when the vocabulary is that small);
  or ``nll``: the increase of the per-token negative log-likelihood of the text.
  The KL form ranks units far more steadily from the same tokens: a probe moves
  a token's NLL up or down by chance, but always moves its distribution
  (benchmarks/profile_cost.py);
- ``choice`` objectives (``arc_easy``, ``arc_challenge``: train + validation;
  ``mmlu``: dev; multiple-choice user tasks with ``fewshot_data``): the prompt of
  lm-eval's task followed by every choice, packed into one sequence per item:
  each choice attends to the prompt and to itself only and continues the
  prompt's positions, so the prompt is computed once instead of once per
  choice.  The choice log-likelihoods of every item are kept; the cost is, by
  ``choice_cost``, ``kl`` (default): the mean over items of the KL divergence
  from the full-precision model's distribution over the choices (softmax of
  the choice log-likelihoods) to the probe's, i.e. the expected increase of
  -log p(answer | choices) when answers follow the full-precision model;
  ``gold``: the increase of the mean -log p(gold | choices); or ``token-kl``:
  the token KL of text objectives on the choices' tokens; or ``auto`` (the default): token-kl for an
  objective of fewer than ``AUTO_CHOICE_ITEMS`` (100) items, else kl.  On SmolLM2-135M's
  ARC-Easy the gold form ranks layers no better than noise at 4 bits
  (split-half stability 0.11 with 236 items, 0.12 with 472), the KL form
  steadily (0.63 and 0.69; benchmarks/arc_objective.py), because the sign of a
  probe's effect on the gold answer varies from item to item while the change
  of the answer distribution does not.  With few items the answer distribution
  is itself too noisy: on the 49 items of ``tasa run``'s 768-token profile the
  kl form's 3-bit split-half stability is 0.29, and it predicts the kl ranking
  of 423 held-out items with tau 0.51 +- 0.07 over random 49-item draws, the
  token-kl form 0.56 +- 0.04 (stability 0.84); from ~100 items on kl is the
  better predictor (0.60 against 0.57 at 160), hence ``auto``.

Probe rows never come from an evaluation split, so profiles cannot leak into
final tables.  Rows are taken in a seeded random order until the objective
holds ``min_tokens`` scored tokens.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from tasa.config import AUTO_CHOICE_ITEMS, CHOICE_COSTS, TOKEN_COSTS
from tasa.data.sources import arc_doc, builtin_rows
from tasa.errors import TasaError
from tasa.eval.lm import encode_pair
from tasa.eval.tasks import Task, get_task, gsm8k_doc, mmlu_doc, row_docs

PROBE_SPLITS = {"gsm8k": ("train",), "arc_easy": ("train", "validation"),
                "arc_challenge": ("train", "validation"), "mmlu": ("dev",)}
_CONVERT = {"gsm8k": gsm8k_doc, "arc_easy": arc_doc, "arc_challenge": arc_doc, "mmlu": mmlu_doc}


@dataclass
class Objective:
    """Probe sequences of one objective, right-padded, with what to score and how they attend.

    ``pred_pos[r, t]`` is the position whose logits predict token t (t - 1 except
    for the first token of a packed choice); ``token_choice[r, t]`` the choice a
    scored token belongs to; ``attend`` (choice kind only) the (N, T, T)
    may-attend mask and ``position_ids`` the positions of packed rows.
    """

    name: str
    kind: str  # "nll" or "choice"
    input_ids: torch.Tensor  # (N, T)
    score_mask: torch.Tensor  # (N, T) bool: token t is scored
    pred_pos: torch.Tensor  # (N, T) long
    token_choice: torch.Tensor  # (N, T) long, 0 where unscored
    gold: torch.Tensor  # (N,) gold choice of each item (row); 0 for nll items
    attend: torch.Tensor | None = None  # (N, T, T) bool
    position_ids: torch.Tensor | None = None  # (N, T) long
    choice_cost: str = "kl"  # choice kind: "kl", "gold" or "token-kl" (see the module docstring)
    token_cost: str = "kl"  # nll kind: "kl" or "nll" (see the module docstring)

    @property
    def token_kl(self) -> bool:
        """Whether this objective is scored by the per-token KL: text objectives with ``token_cost`` kl,
        multiple-choice objectives with ``choice_cost`` token-kl."""
        return self.token_cost == "kl" if self.kind == "nll" else self.choice_cost == "token-kl"

    @property
    def n_items(self) -> int:
        return int(self.gold.numel())

    @property
    def scored_tokens(self) -> int:
        return int(self.score_mask.sum())

    def batch(self, rows: slice, dtype: torch.dtype, device) -> "Batch":
        """The model's forward kwargs and scoring tensors for ``rows``, trimmed to their last scored column."""
        used = self.score_mask[rows].any(0).nonzero()
        w = int(used.max()) + 1 if used.numel() else 1
        kw = {"input_ids": self.input_ids[rows, :w].to(device)}
        if self.attend is not None:
            attend = self.attend[rows, :w, :w]
            mask = torch.zeros(attend.shape, dtype=dtype)
            mask.masked_fill_(~attend, torch.finfo(dtype).min)
            kw["attention_mask"] = mask[:, None].to(device)
            kw["position_ids"] = self.position_ids[rows, :w].to(device)
        return Batch(kw, self.score_mask[rows, :w].to(device), self.pred_pos[rows, :w].to(device))

    def row_slices(self, batch_tokens: int, max_scored: int | None = None) -> list[slice]:
        """Consecutive rows grouped so that each batch holds at most ``batch_tokens`` padded tokens (and
        ``max_scored`` scored ones); one row at least.  Rows are sorted longest first, so padding stays small."""
        if batch_tokens < 1:
            raise TasaError(f"batch tokens must be positive, got {batch_tokens}")
        lengths = [int(m.nonzero().max()) + 1 if m.any() else 1 for m in self.score_mask]
        scored = self.score_mask.sum(1).tolist()
        out, s = [], 0
        while s < len(lengths):
            e, n = s + 1, scored[s]
            while (e < len(lengths) and (e - s + 1) * max(lengths[s:e + 1]) <= batch_tokens
                   and (max_scored is None or n + scored[e] <= max_scored)):
                n += scored[e]
                e += 1
            out.append(slice(s, e))
            s = e
        return out

    def subset(self, rows: slice) -> "Objective":
        """The objective restricted to ``rows`` (items)."""
        return Objective(self.name, self.kind, self.input_ids[rows], self.score_mask[rows], self.pred_pos[rows],
                         self.token_choice[rows], self.gold[rows],
                         None if self.attend is None else self.attend[rows],
                         None if self.position_ids is None else self.position_ids[rows], self.choice_cost,
                         self.token_cost)


@dataclass
class Batch:
    """Rows of an objective ready for a forward pass."""

    inputs: dict  # model forward kwargs
    score_mask: torch.Tensor  # (B, w)
    pred_pos: torch.Tensor  # (B, w)


def _pack(rows: list[tuple[list[int], list[int]]], gold: list[int], name: str) -> Objective:
    """rows: (prompt ids, [choice ids, ...]) per item; nll items have one "choice" (the gold text).

    Items are ordered by length, longest first, so that batches of neighbours carry little padding."""
    order = sorted(range(len(rows)), key=lambda i: -(len(rows[i][0]) + sum(map(len, rows[i][1]))))
    rows, gold = [rows[i] for i in order], [gold[i] for i in order]
    packed = [ctx + [t for c in conts for t in c] for ctx, conts in rows]
    width = max(len(p) for p in packed)
    n = len(rows)
    input_ids = torch.zeros((n, width), dtype=torch.long)
    score = torch.zeros((n, width), dtype=torch.bool)
    pred = (torch.arange(width) - 1).clamp_min(0).repeat(n, 1)
    token_choice = torch.zeros((n, width), dtype=torch.long)
    multi = any(len(conts) > 1 for _, conts in rows)
    attend = torch.tril(torch.ones(width, width, dtype=torch.bool)).repeat(n, 1, 1) if multi else None
    position_ids = torch.arange(width).repeat(n, 1) if multi else None
    for r, ((ctx, conts), p) in enumerate(zip(rows, packed)):
        input_ids[r, : len(p)] = torch.tensor(p)
        start = len(ctx)
        for c, cont in enumerate(conts):
            end = start + len(cont)
            score[r, max(start, 1):end] = True
            token_choice[r, start:end] = c
            if multi:
                pred[r, start] = len(ctx) - 1
                attend[r, start:end, len(ctx):start] = False  # a choice does not see earlier choices
                position_ids[r, start:end] = torch.arange(len(ctx), len(ctx) + len(cont))
            start = end
        if multi and len(p) < width:  # padding: its own causal rows, never scored
            position_ids[r, len(p):] = torch.arange(len(p), width)
    return Objective(name, "choice" if multi else "nll", input_ids, score, pred, token_choice, torch.tensor(gold),
                     attend, position_ids)


def _probe_docs(task: Task, name: str) -> list[dict]:
    if name in PROBE_SPLITS:
        docs = []
        for split in PROBE_SPLITS[name]:
            docs += row_docs(lambda s=split: builtin_rows(name, s), _CONVERT[name], name)()
        return docs
    if task.fewshot_docs is None or task.fewshot_from_eval:
        raise TasaError(f"user task {name}: profiling needs probe rows apart from the evaluation rows; "
                        "give the spec a 'fewshot_data' file")
    return task.fewshot_docs()


KL_TOPK = 256  # reference log-probs kept per scored token for the token KL


def build_objective(name: str, tokenizer, min_tokens: int = 4096, seqlen: int = 512, seed: int = 0,
                    max_length: int | None = None, choice_cost: str = "kl", token_cost: str = "kl") -> Objective:
    """Probe sequences of objective ``name`` (a built-in task or a task spec file) with >= ``min_tokens`` scored."""
    if min_tokens < 1:
        raise TasaError(f"probe tokens must be positive, got {min_tokens}")
    if choice_cost not in CHOICE_COSTS:
        raise TasaError(f"choice cost must be {' or '.join(CHOICE_COSTS)}, got {choice_cost!r}")
    if token_cost not in TOKEN_COSTS:
        raise TasaError(f"token cost must be {' or '.join(TOKEN_COSTS)}, got {token_cost!r}")
    if name == "wikitext2":
        text = "\n\n".join(builtin_rows("wikitext2", "validation")[0])
        ids = tokenizer(text, add_special_tokens=False).input_ids
        n = -(-min_tokens // (seqlen - 1))
        if n * seqlen > len(ids):
            raise TasaError(f"wikitext2 validation holds {len(ids)} tokens, fewer than {n} windows of {seqlen}")
        starts = sorted(random.Random(seed).sample(range(len(ids) // seqlen), n))
        rows = [(ids[s * seqlen:s * seqlen + 1], [ids[s * seqlen + 1:(s + 1) * seqlen]]) for s in starts]
        obj = _pack(rows, [0] * n, name)
        obj.token_cost = token_cost
        return obj
    task = get_task(name)
    docs = _probe_docs(task, name)
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    rows, gold = [], []
    scored = 0
    for i in order:
        doc = docs[i]
        context = task.contexts([doc], 0)[0]
        if task.kind == "multiple_choice":
            texts = [task.target_delimiter + c for c in task.doc_to_choices(doc)]
            gold.append(task.doc_to_gold(doc))
        else:
            target = task.doc_to_target(doc)
            if not target:
                raise TasaError(f"task {name} has no gold text to score; give its spec a 'target'")
            texts = [task.target_delimiter + target]
            gold.append(0)
        pairs = [encode_pair(tokenizer, context, t) for t in texts]  # the prompt's ids are the same for all
        ctx, conts = pairs[0][0], [p[1] for p in pairs]
        if max_length is not None and len(ctx) + sum(map(len, conts)) > max_length:
            keep = max_length - sum(map(len, conts))
            if keep < 1:
                continue
            ctx = ctx[-keep:]
        rows.append((ctx, conts))
        scored += sum(map(len, conts))
        if scored >= min_tokens:
            break
    if scored < min_tokens:
        raise TasaError(f"{name}: its probe rows hold only {scored} scored tokens, fewer than {min_tokens}")
    obj = _pack(rows, gold, name)
    obj.kind = "choice" if task.kind == "multiple_choice" else "nll"
    obj.choice_cost = choice_cost if choice_cost != "auto" else "token-kl" if len(rows) < AUTO_CHOICE_ITEMS else "kl"
    obj.token_cost = token_cost
    return obj


@dataclass
class ItemLosses:
    """Per-item raw material of an objective's cost: NLL sums and token counts, choice log-likelihoods, and
    summed token KL divergences from the reference."""

    nll: torch.Tensor  # (n_items,) summed NLL (nll kind) or -log p(gold | choices) (choice kind)
    tokens: torch.Tensor  # (n_items,) scored tokens (nll kind) or ones (choice kind)
    choice_logp: torch.Tensor | None = None  # choice kind: (n_items, n_choices) log p(choice | choices)
    kl: torch.Tensor | None = None  # (n_items,) summed per-token KL(reference || model) (probes; not the reference)

    def cost(self) -> float:
        return float(self.nll.sum() / self.tokens.sum())


def _pad_to(t: torch.Tensor, width: int) -> torch.Tensor:
    """Trimmed batches: the columns beyond hold no scored token."""
    return torch.nn.functional.pad(t, (0, width - t.shape[1])) if t.shape[1] < width else t


def item_losses(objective: Objective, token_nll: torch.Tensor, token_kl: torch.Tensor | None = None) -> ItemLosses:
    """Per-item losses from per-token NLL (N, <= T) (zero where unscored) and, when given, per-token KL from the
    reference (N, <= T), summed over each item's scored tokens; one item per row."""
    n = objective.n_items
    width = objective.score_mask.shape[1]
    token_nll = _pad_to(token_nll, width).double() * objective.score_mask
    kl = None if token_kl is None else (_pad_to(token_kl, width).double() * objective.score_mask).sum(1)
    if objective.kind == "nll":
        return ItemLosses(token_nll.sum(1), objective.score_mask.sum(1).double(), kl=kl)
    n_choices = int(objective.token_choice.max()) + 1
    lls = -torch.zeros((n, n_choices), dtype=torch.float64).scatter_add_(1, objective.token_choice, token_nll)
    present = torch.zeros((n, n_choices), dtype=torch.float64).scatter_add_(
        1, objective.token_choice, objective.score_mask.double()) > 0
    lls = lls.masked_fill(~present, float("-inf"))
    logp = torch.log_softmax(lls, dim=1)
    return ItemLosses(-logp[torch.arange(n), objective.gold], torch.ones(n, dtype=torch.float64), logp, kl)


def choice_kl(base_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Per-item KL(base || probe) between distributions over choices given as log-probs (-inf: absent)."""
    p = base_logp.exp()
    terms = torch.where(p > 0, p * (base_logp - logp), torch.zeros_like(p))
    return terms.sum(1)
