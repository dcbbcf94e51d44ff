"""Scores of one forward pass at the positions that predict scored tokens: the target's NLL, the top-k
log-probs (a reference kept for later passes) and the KL divergence from such a reference.

The output embedding sees only the gathered positions and runs on chunks of positions holding at most
``HEAD_CHUNK`` logits, so no (tokens x vocabulary) tensor is held.  Models whose logits are not the output
embedding's plain linear map (soft-capping, logit scaling) run their own head on the gathered positions.
Used by the probes (tasa.profile.probe) and the gradient estimators (tasa.profile.estimators).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tasa.errors import TasaError
from tasa.eval.metrics import TokenScores, logp_scores
from tasa.models.streaming import held
from tasa.models.walker import StopForward
from tasa.profile.objectives import Batch


HEAD_CHUNK = 1 << 24  # logits held at once by the head's position chunks (64 MiB of float32)


def _cat_scores(parts: list[TokenScores]) -> TokenScores:
    top = None if parts[0].topk is None else tuple(torch.cat([p.topk[j] for p in parts]) for j in range(2))
    kl = None if parts[0].kl is None else torch.cat([p.kl for p in parts])
    return TokenScores(torch.cat([p.nll for p in parts]), top, kl)


def head_scores(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, topk: int = 0,
                reference: tuple[torch.Tensor, torch.Tensor] | None = None, chunk: int | None = None) -> TokenScores:
    """:func:`logp_scores` from final hidden states (n, H) through the model's output embedding, in chunks of
    ``chunk`` positions (default: as many as keep HEAD_CHUNK logits), so no (n, vocab) tensor is ever held."""
    head = model.get_output_embeddings()
    step = chunk or max(1, HEAD_CHUNK // head.weight.shape[0])
    parts = []
    with held(model, head):  # a streamed head is read once for all chunks
        for s in range(0, hidden.shape[0], step):
            logp = F.log_softmax(head(hidden[s:s + step]).float(), dim=-1)
            ref = None if reference is None else (reference[0][s:s + step], reference[1][s:s + step])
            parts.append(logp_scores(logp, targets[s:s + step], topk, ref))
    if not parts:
        return logp_scores(hidden.new_zeros((0, head.weight.shape[0])).float(), targets, topk, reference)
    return _cat_scores(parts)


def head_nll(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """NLL of ``targets`` (n,) from final hidden states (n, H); see :func:`head_scores`."""
    return head_scores(model, hidden, targets, chunk=chunk).nll


def forward_token_scores(model: nn.Module, batch: Batch, plain_head: bool = True, topk: int = 0,
                         reference: tuple[torch.Tensor, torch.Tensor] | None = None) -> TokenScores:
    """Scores of every scored token of ``batch`` from one forward pass of ``model``: ``nll`` (B, w) (zero
    where unscored), ``kl`` (B, w) from ``reference`` (the top-k log-probs and ids of the scored tokens in
    mask order, as ``topk`` returns them here), and ``topk`` (n_scored, k) when asked.

    The output embedding sees only the positions that predict a scored token.
    ``plain_head``: the logits are the output embedding's linear map of its
    input (checked by :func:`head_is_plain`), so the head is computed here in
    position chunks; otherwise (soft-capping, logit scaling) the model's own
    head and post-processing run on the gathered positions.
    """
    sel = batch.score_mask.nonzero(as_tuple=True)
    rows, pos = sel[0], batch.pred_pos[sel]
    targets = batch.inputs["input_ids"][sel]
    captured = {}

    def gather(_m, args, kwargs):
        h = (args[0] if args else kwargs.pop("input"))[rows, pos]
        captured["reached"] = True
        if plain_head:
            captured["h"] = h
            raise StopForward
        return (h[None], *args[1:]), kwargs

    handle = model.get_output_embeddings().register_forward_pre_hook(gather, with_kwargs=True)
    try:
        try:
            out = model(**batch.inputs, use_cache=False)
        except StopForward:
            out = None
    finally:
        handle.remove()
    if "reached" not in captured:
        raise TasaError("the model's forward pass does not use its output embeddings; unsupported layout")
    if plain_head:
        sc = head_scores(model, captured["h"], targets, topk, reference)
    else:
        sc = logp_scores(F.log_softmax(out.logits[0].float(), dim=-1), targets, topk, reference)
    return TokenScores(_scatter(batch, sel, sc.nll), sc.topk, None if sc.kl is None else _scatter(batch, sel, sc.kl))


def _scatter(batch: Batch, sel: tuple[torch.Tensor, torch.Tensor], v: torch.Tensor) -> torch.Tensor:
    """Values of the scored tokens (in mask order) laid out as the batch's (B, w) score mask, zero elsewhere."""
    return torch.zeros(batch.score_mask.shape, dtype=v.dtype, device=v.device).index_put(sel, v)


def logits_token_nll(batch: Batch, logits: torch.Tensor) -> torch.Tensor:
    """NLL of every scored token of ``batch`` (zero elsewhere) from the model's full (B, T, vocab) ``logits``
    (differentiable; what :func:`forward_token_scores` computes from its own forward pass)."""
    sel = batch.score_mask.nonzero(as_tuple=True)
    scores = logp_scores(F.log_softmax(logits[sel[0], batch.pred_pos[sel]].float(), dim=-1),
                         batch.inputs["input_ids"][sel], 0, None)
    return _scatter(batch, sel, scores.nll)


def forward_token_nll(model: nn.Module, batch: Batch, plain_head: bool = True) -> torch.Tensor:
    """NLL of every scored token of ``batch`` (zero elsewhere); see :func:`forward_token_scores`."""
    return forward_token_scores(model, batch, plain_head).nll
