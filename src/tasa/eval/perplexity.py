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


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean per-token negative log-likelihood (nats)
    windows: int
    tokens: int  # scored tokens
    seqlen: int
    seconds: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


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


def window_nll(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True,
               desc: str = "perplexity") -> torch.Tensor:
    """Summed next-token NLL (nats) of each window, shape (n_windows,)."""
    device = next(model.parameters()).device
    sums = []
    with torch.no_grad():
        for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress):
            batch = windows[start:start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits  # (B, T, V)
            logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
            nll = -logp.gather(-1, batch[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)
            sums.append(nll.sum(dim=1).cpu())
    return torch.cat(sums)


def perplexity(model, tokenizer, text: str, seqlen: int = 512, limit: int | None = None, batch_size: int = 4,
               progress: bool = True) -> PerplexityResult:
    max_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_len is not None and seqlen > max_len:
        raise TasaError(f"seqlen {seqlen} exceeds the model's maximum context of {max_len} tokens")
    t0 = time.perf_counter()
    windows = eval_windows(tokenizer, text, seqlen, limit)
    sums = window_nll(model, windows, batch_size, progress)
    tokens = windows.shape[0] * (seqlen - 1)
    nll = float(sums.sum()) / tokens
    return PerplexityResult(math.exp(nll), nll, windows.shape[0], tokens, seqlen, time.perf_counter() - t0)
