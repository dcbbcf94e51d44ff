"""Scoring functions: pure, no model.

Multiple choice follows lm-eval 0.4.x: ``acc`` takes the choice with the
highest summed log-likelihood, ``acc_norm`` divides each by the choice's length
in characters; ties go to the first choice (``numpy.argmax``).  GSM8K answers
are extracted and compared like lm-eval's ``strict-match`` and
``flexible-extract`` filters with its ``exact_match`` settings (the task
supplies the patterns).
"""
from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass
from typing import Sequence

import torch

INVALID = "[invalid]"


def argmax_first(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties (numpy.argmax)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def multiple_choice(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict:
    """acc, acc_norm and the continuous scores of one multiple-choice item."""
    if len(lls) != len(choices) or not choices:
        raise ValueError("one log-likelihood per choice is needed")
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold index {gold} out of range for {len(choices)} choices")
    pred = argmax_first(lls)
    pred_norm = argmax_first([ll / len(c) if len(c) else ll for ll, c in zip(lls, choices)])
    wrong = [ll for i, ll in enumerate(lls) if i != gold]
    return {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold), "pred": pred, "pred_norm": pred_norm,
            "gold_logprob": float(lls[gold]), "margin": float(lls[gold] - max(wrong)) if wrong else 0.0}


def regex_extract(text: str, pattern: str, group_select: int = 0, fallback: str = INVALID) -> str:
    """lm-eval's RegexFilter followed by take_first, for one response."""
    matches = re.findall(pattern, text)
    if not matches:
        return fallback
    m = matches[group_select]
    if isinstance(m, tuple):
        m = [x for x in m if x]
        m = m[0] if m else fallback
    return m.strip()


def normalize_answer(text: str, ignore: Sequence[str] = (), ignore_case: bool = True,
                     ignore_punctuation: bool = False) -> str:
    """What lm-eval's exact_match does to both prediction and reference before comparing."""
    for pattern in ignore:
        text = re.sub(pattern, "", text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    return text


def exact_match(prediction: str, reference: str, ignore: Sequence[str] = (), ignore_case: bool = True) -> float:
    return float(normalize_answer(prediction, ignore, ignore_case) == normalize_answer(reference, ignore, ignore_case))


def generation_scores(response: str, reference: str, patterns: dict, ignore: Sequence[str]) -> dict:
    """Each metric's extracted answer and exact match: ``patterns`` maps metric -> (regex, group_select)."""
    out = {}
    for metric, (pattern, group_select) in patterns.items():
        answer = regex_extract(response, pattern, group_select)
        out[metric] = exact_match(answer, reference, ignore)
        out[f"{metric}_answer"] = answer
    return out


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n)), as lm-eval reports."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def ratio_stderr(num: Sequence[float], den: Sequence[float]) -> tuple[float, float]:
    """sum(num)/sum(den) and its delta-method standard error (e.g. per-token NLL over items)."""
    n = len(num)
    total = sum(den)
    if n == 0 or total == 0:
        return float("nan"), float("nan")
    r = sum(num) / total
    if n == 1:
        return r, float("nan")
    mean_den = total / n
    resid = [a - r * b for a, b in zip(num, den)]
    var = sum(x * x for x in resid) / (n - 1)
    return r, math.sqrt(var / n) / mean_den


def flips(reference: Sequence[float], current: Sequence[float]) -> dict:
    """Items whose correctness changed against the reference, both directions (lists of 0/1)."""
    if len(reference) != len(current):
        raise ValueError(f"reference has {len(reference)} items, this run {len(current)}")
    to_wrong = sum(1 for a, b in zip(reference, current) if a >= 0.5 > b)
    to_right = sum(1 for a, b in zip(reference, current) if b >= 0.5 > a)
    n = len(current)
    return {"flip_rate": (to_wrong + to_right) / n if n else float("nan"),
            "flips_correct_to_wrong": to_wrong, "flips_wrong_to_correct": to_right}


def topk_kl(ref_logp: torch.Tensor, ref_idx: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P) per position from the reference's top-k log-probs and the model's full log-probs.

    ``ref_logp``/``ref_idx``: (N, k) top-k log-probs and token ids of the reference;
    ``logp``: (N, V) log-probs of the model.  The reference's tail (tokens outside
    its top k) is one bucket: KL over {top-k tokens, rest}.  By the data-processing
    inequality this is a lower bound of the full KL, exact when k = V; with k = V
    (the tail empty) it equals the full KL.
    """
    ref_logp = ref_logp.float()
    logp = logp.float()
    q_top = logp.gather(-1, ref_idx)
    kl = (ref_logp.exp() * (ref_logp - q_top)).sum(-1)
    p_tail = (1.0 - ref_logp.exp().sum(-1)).clamp_min(0.0)
    q_tail = (1.0 - q_top.exp().sum(-1)).clamp_min(1e-12)
    tail = torch.where(p_tail > 1e-9, p_tail * (torch.log(p_tail.clamp_min(1e-12)) - torch.log(q_tail)),
                       torch.zeros_like(p_tail))
    return (kl + tail).clamp_min(0.0)


@dataclass
class TokenScores:
    """Scores of positions from their log-probs: the target's NLL, and as asked the top-k log-probs (a
    reference for later passes) and the KL divergence from such a reference."""

    nll: torch.Tensor  # (...)
    topk: tuple[torch.Tensor, torch.Tensor] | None = None  # (logp (..., k), idx (..., k))
    kl: torch.Tensor | None = None  # (...) KL(reference || this model), see topk_kl


def logp_scores(logp: torch.Tensor, targets: torch.Tensor, topk: int = 0,
                reference: tuple[torch.Tensor, torch.Tensor] | None = None) -> TokenScores:
    """:class:`TokenScores` from log-probs (..., V) of the positions predicting ``targets`` (...)."""
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    top = None
    if topk:
        v, i = logp.topk(min(topk, logp.shape[-1]), dim=-1)
        top = (v, i)
    kl = None if reference is None else topk_kl(reference[0], reference[1].long(), logp)
    return TokenScores(nll, top, kl)
