"""Perplexity in the GPTQ convention.

The evaluation text (WikiText-2 test: ``"\\n\\n".join(rows)``) is tokenised once
without special tokens and cut into non-overlapping windows of ``seqlen``
tokens (the tail shorter than a window is dropped).  Each window is scored
independently; perplexity is exp of the mean next-token NLL over all
predicted tokens (seqlen - 1 per window).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tasa.errors import TasaError
from tasa.models import compute_device
from tasa.models.walker import forward_logits


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean per-token negative log-likelihood (nats)
    windows: int
    tokens: int  # scored tokens
    seqlen: int
    seconds: float
    kl: float | None = None  # mean KL(reference || model) per token, when a reference was given
    kl_stderr: float | None = None  # over windows
    ref_topk_mass: float | None = None  # mean probability mass the reference's top-k covers
    topk: dict | None = None  # this model's top-k log-probs ("logp" float32, "idx" int32), when asked

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "topk"}


def eval_windows(tokenizer, text: str, seqlen: int, limit: int | None = None) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    n = ids.numel() // seqlen
    if n == 0:
        raise TasaError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if limit is not None:
        if limit < 1:
            raise TasaError(f"--limit must be positive, got {limit}")
        n = min(n, limit)
    return ids[: n * seqlen].view(n, seqlen)


@dataclass
class WindowScores:
    nll: torch.Tensor  # (n_windows,) summed next-token NLL
    kl: torch.Tensor | None  # (n_windows,) summed KL against the reference
    topk: dict | None


def window_scores(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True, topk: int = 0,
                  reference: dict | None = None, desc: str = "perplexity") -> WindowScores:
    """Summed next-token NLL of each window; optionally this model's top-k log-probs and KL to a reference.

    ``reference`` holds a reference model's top-k log-probs on the same windows
    (``{"logp": (n, T-1, k), "idx": (n, T-1, k)}``, as returned here with ``topk=k``).
    """
    from tasa.eval.metrics import logp_scores

    device = compute_device(model)
    if reference is not None and tuple(reference["idx"].shape[:2]) != (windows.shape[0], windows.shape[1] - 1):
        raise TasaError(f"the reference was scored on {reference['idx'].shape[0]} windows of "
                        f"{reference['idx'].shape[1] + 1} tokens, this run on {windows.shape[0]} of "
                        f"{windows.shape[1]}; use the same --limit and --seqlen")
    sums, kls, top_lp, top_idx = [], [], [], []
    starts = range(0, windows.shape[0], batch_size)
    batches = [{"input_ids": windows[start:start + batch_size]} for start in starts]
    with torch.no_grad():
        for k, logits in tqdm(forward_logits(model, batches, progress, desc), total=len(batches), desc=desc,
                              disable=not progress):  # (B, T, V); a streamed model's layer-major
            start = starts[k]
            batch = windows[start:start + batch_size].to(device)
            logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
            ref = None if reference is None else (reference["logp"][start:start + batch_size].to(device),
                                                  reference["idx"][start:start + batch_size].to(device))
            sc = logp_scores(logp, batch[:, 1:], topk, ref)  # per position of (B, T-1)
            sums.append(sc.nll.sum(dim=1).cpu())
            if sc.topk is not None:
                top_lp.append(sc.topk[0].cpu())
                top_idx.append(sc.topk[1].int().cpu())
            if sc.kl is not None:
                kls.append(sc.kl.sum(dim=1).cpu())
    return WindowScores(torch.cat(sums), torch.cat(kls) if kls else None,
                        {"logp": torch.cat(top_lp), "idx": torch.cat(top_idx)} if topk else None)


def perplexity(model, tokenizer, text: str, seqlen: int = 512, limit: int | None = None, batch_size: int = 4,
               progress: bool = True, topk: int = 0, reference: dict | None = None) -> PerplexityResult:
    """Perplexity on ``text``; with ``reference`` also the mean KL(reference || model) per token."""
    max_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_len is not None and seqlen > max_len:
        raise TasaError(f"seqlen {seqlen} exceeds the model's maximum context of {max_len} tokens")
    t0 = time.perf_counter()
    windows = eval_windows(tokenizer, text, seqlen, limit)
    s = window_scores(model, windows, batch_size, progress, topk=topk, reference=reference)
    tokens = windows.shape[0] * (seqlen - 1)
    nll = float(s.nll.sum()) / tokens
    res = PerplexityResult(math.exp(nll), nll, windows.shape[0], tokens, seqlen, 0.0, topk=s.topk)
    if s.kl is not None:
        per_window = s.kl / (seqlen - 1)
        res.kl = float(per_window.mean())
        res.kl_stderr = float(per_window.std() / math.sqrt(len(per_window))) if len(per_window) > 1 else None
        res.ref_topk_mass = float(reference["logp"].float().exp().sum(-1).mean())
    res.seconds = time.perf_counter() - t0
    return res
