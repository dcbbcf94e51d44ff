"""Scoring a causal LM: log-likelihood of continuations and greedy generation.

Tokenisation follows lm-eval 0.4.x's Hugging Face backend exactly, so the
numbers are comparable: a context's trailing whitespace moves to the front of
the continuation, ``context + continuation`` is encoded as a whole and the
continuation tokens are what follows the encoded context; no special tokens
are added (an empty context is replaced by the EOS token).

Speed, without changing results beyond float noise:

- requests are batched by length (longest first, so padding is small);
- identical contexts are encoded and run once: with ``prefix_cache`` (default)
  a batch of distinct contexts is run once to fill a KV cache, whose rows are
  repeated for every continuation of that context; the continuation pass then
  scores only continuation positions (the vocabulary log-softmax is the costly
  part for small models, so it is never computed on context positions).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tasa.errors import TasaError
from tasa.models import compute_device
from tasa.models.streaming import streamer_of
from tasa.models.walker import LAYER_MAJOR_BYTES, forward_logits, token_state_bytes


@dataclass(frozen=True)
class LLResult:
    """Log-likelihood of one continuation: summed log-prob (nats), token count, greedy flag."""

    logprob: float
    tokens: int
    is_greedy: bool


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) the way lm-eval's HF backend splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if context == "":
        eos = tokenizer.eos_token_id
        if eos is None:
            raise TasaError("an empty context needs the tokenizer's EOS token, and this tokenizer has none")
        return [eos], tokenizer(continuation, add_special_tokens=False).input_ids
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx):]


def _model_device(model) -> torch.device:
    return compute_device(model)


def _max_length(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", None) or 2048)


def _score(logits: torch.Tensor, target: Sequence[int]) -> LLResult:
    """Log-likelihood of ``target`` where ``logits[j]`` predicts ``target[j]`` (extra positions ignored)."""
    lg = logits[: len(target)].float()
    logp = F.log_softmax(lg, dim=-1)
    t = torch.tensor(list(target), device=lg.device)
    return LLResult(float(logp.gather(-1, t[:, None]).sum()), len(target), bool((lg.argmax(-1) == t).all()))


def _pad(rows: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad rows to a (B, L) id tensor and its 0/1 attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def loglikelihoods(model, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 16,
                   prefix_cache: bool = True, progress: bool = True, desc: str = "loglikelihood") -> list[LLResult]:
    """Log-likelihood of each ``(context, continuation)`` request, in request order.

    ``batch_size`` counts continuations per forward pass.  Results equal a
    direct forward pass over ``context + continuation`` up to float noise.
    """
    if batch_size < 1:
        raise TasaError(f"batch size must be positive, got {batch_size}")
    encoded = [encode_pair(tokenizer, c, x) for c, x in requests]
    for (c, x), (_, cont) in zip(requests, encoded):
        if not cont:
            raise TasaError(f"continuation {x!r} encodes to no tokens after context {c[-40:]!r}")
    max_len = _max_length(model)
    # lm-eval keeps the last max_length + 1 tokens of context + continuation
    seqs = []
    for ctx, cont in encoded:
        whole = (ctx + cont)[-(max_len + 1):]
        seqs.append((tuple(whole[: len(whole) - len(cont)]), tuple(cont)))
    results: list[LLResult | None] = [None] * len(requests)
    if prefix_cache and streamer_of(model) is None:  # a streamed model runs layer-major (each layer read once)
        _run_prefix_shared(model, seqs, results, batch_size, progress, desc)
    else:
        _run_full(model, seqs, results, batch_size, progress, desc)
    return results  # type: ignore[return-value]


def _run_full(model, seqs, results, batch_size, progress, desc) -> None:
    """Each request as one sequence ``context + continuation[:-1]``; the lm-eval way."""
    order = sorted(range(len(seqs)), key=lambda i: -(len(seqs[i][0]) + len(seqs[i][1])))
    groups = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    batches = []
    for idx in groups:
        ids, mask = _pad([list(seqs[i][0] + seqs[i][1])[:-1] for i in idx], 0, "cpu")
        batches.append({"input_ids": ids, "attention_mask": mask})
    for k, logits in tqdm(forward_logits(model, batches, progress, desc), total=len(batches), desc=desc,
                          disable=not progress):
        for j, i in enumerate(groups[k]):
            ctx, cont = seqs[i]
            results[i] = _score(logits[j, len(ctx) - 1:], cont)


def _densify(_module, args):
    x = args[0]
    dense = [1] * x.dim()
    for d in range(x.dim() - 2, -1, -1):
        dense[d] = dense[d + 1] * x.shape[d + 1]
    if x.dim() < 3 or list(x.stride()) == dense:
        return None
    return (x.clone(memory_format=torch.contiguous_format),) + tuple(args[1:])


@contextmanager
def dense_head_input(model):
    """Within the block the output head reads a dense copy of its input.  ``logits_to_keep=1`` hands the head the
    hidden states' last position, a view whose batch stride spans the whole sequence; torch 2.13's CPU bfloat16
    ``linear`` cannot flatten such an input into one matrix product when the weight needs no gradient (a
    streamed model's), and broadcasts the weight into a batched product instead, ~100x slower: about 3 s of a
    1B model's prompt pass in its 128k-token head against 0.07 s (docs/RESULTS.md).  The copy is one hidden
    vector per row (tests/unit/test_eval_lm.py: the head's input is dense, the logits equal)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(_densify)
    try:
        yield
    finally:
        handle.remove()


def _run_prefix_shared(model, seqs, results, batch_size, progress, desc) -> None:
    """Run each distinct context once into a KV cache, then all its continuations from that cache."""
    device = _model_device(model)
    by_ctx: dict[tuple, list[int]] = {}
    for i, (ctx, _) in enumerate(seqs):
        by_ctx.setdefault(ctx, []).append(i)
    contexts = sorted(by_ctx, key=lambda c: -len(c))
    bar = tqdm(total=len(seqs), desc=desc, disable=not progress)
    with torch.no_grad(), dense_head_input(model):  # the prefix pass keeps one position's logits
        start = 0
        while start < len(contexts):
            # take contexts until their continuations fill a batch (at least one context)
            chunk, n = [], 0
            while start < len(contexts) and (not chunk or n + len(by_ctx[contexts[start]]) <= batch_size):
                chunk.append(contexts[start])
                n += len(by_ctx[contexts[start]])
                start += 1
            _score_chunk(model, device, chunk, by_ctx, seqs, results)
            bar.update(n)
    bar.close()


def _score_chunk(model, device, chunk, by_ctx, seqs, results) -> None:
    prefixes = [list(c[:-1]) for c in chunk]  # the last context token is fed with the continuation
    req_ids = [i for c in chunk for i in by_ctx[c]]
    owner = [k for k, c in enumerate(chunk) for _ in by_ctx[c]]
    rows = [[seqs[i][0][-1]] + list(seqs[i][1][:-1]) for i in req_ids]
    ids, cont_mask = _pad(rows, 0, device)
    if all(len(p) == 0 for p in prefixes):
        logits = model(input_ids=ids, attention_mask=cont_mask, use_cache=False).logits
    elif any(len(p) == 0 for p in prefixes):  # a fully padded cache row would attend to nothing
        for c in chunk:
            _score_chunk(model, device, [c], by_ctx, seqs, results)
        return
    else:
        p_ids, p_mask = _pad(prefixes, 0, device)
        out = model(input_ids=p_ids, attention_mask=p_mask, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        sel = torch.tensor(owner, device=device)
        cache.reorder_cache(sel)
        mask = torch.cat([p_mask[sel], cont_mask], dim=1)
        plen = torch.tensor([len(prefixes[k]) for k in owner], device=device)
        pos = plen[:, None] + torch.arange(ids.shape[1], device=device)[None, :]
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                       use_cache=True).logits
    for k, i in enumerate(req_ids):
        results[i] = _score(logits[k], seqs[i][1])


# ---- generation ----

def greedy_generate(model, tokenizer, contexts: Sequence[str], until: Iterable[str], max_new_tokens: int = 256,
                    batch_size: int = 8, progress: bool = True, desc: str = "generate") -> list[str]:
    """Greedy continuations of ``contexts``, each cut at the first stop string (lm-eval's generate_until).

    Batched with left padding and a KV cache, longest contexts first (a streamed model in batches as large as
    memory allows: :func:`generation_batches`).  A row
    stops at a stop string, at EOS or after ``max_new_tokens``; stopped rows
    leave the batch (their KV-cache rows are dropped), so a batch costs what its
    still-running rows need rather than what its longest answer needs.
    """
    if max_new_tokens < 1:
        raise TasaError(f"max new tokens must be positive, got {max_new_tokens}")
    stops = [s for s in until if s]
    eos_id = tokenizer.eos_token_id
    if eos_id is not None:
        eos_text = tokenizer.decode([eos_id], skip_special_tokens=False)
        if eos_text and eos_text not in stops:
            stops.append(eos_text)
    max_ctx = _max_length(model) - max_new_tokens
    if max_ctx < 1:
        raise TasaError(f"max new tokens {max_new_tokens} leave no room for a context in the model's "
                        f"{_max_length(model)} positions")
    enc = [tokenizer(c, add_special_tokens=False).input_ids[-max_ctx:] for c in contexts]
    if any(not e for e in enc):
        raise TasaError("an empty prompt cannot be continued")
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
    out: list[str | None] = [None] * len(contexts)
    sizes = generation_batches(model, [len(enc[i]) for i in order], batch_size, max_new_tokens)
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    streamer = streamer_of(model)
    with torch.no_grad(), (streamer.outside_held() if streamer else nullcontext()), dense_head_input(model):
        # embeddings and head read once; the prompt pass keeps one position's logits
        for start, size in tqdm(list(zip(starts, sizes)), desc=desc, disable=not progress):
            idx = order[start:start + size]
            texts = _greedy_batch(model, tokenizer, [enc[i] for i in idx], stops, max_new_tokens, eos_id)
            for i, text in zip(idx, texts):
                for s in stops:
                    text = text.split(s)[0]
                out[i] = text
    return out  # type: ignore[return-value]


def generation_batches(model, lengths: list[int], batch_size: int, max_new_tokens: int,
                       max_bytes: int = LAYER_MAJOR_BYTES) -> list[int]:
    """Row counts of the generation batches over prompts of ``lengths`` tokens (longest first).  A model in
    memory: ``batch_size`` rows each.  A streamed model reads every decoder layer once per generated token of a
    batch, so its batches take as many rows as their state fits in ``max_bytes`` (each row's KV cache at its
    longest, prompt + ``max_new_tokens``, and the prompt's working memory in one layer; tasa.models.walker's
    estimate), never fewer than ``batch_size``."""
    if streamer_of(model) is None:
        return [min(batch_size, len(lengths) - s) for s in range(0, len(lengths), batch_size)]
    kv, work = token_state_bytes(model)
    sizes, start = [], 0
    while start < len(lengths):
        width = lengths[start]  # the batch's longest prompt: every row is padded to it
        fit = max_bytes // ((width + max_new_tokens) * kv + width * work)
        sizes.append(min(max(batch_size, fit), len(lengths) - start))
        start += sizes[-1]
    return sizes


def _greedy_batch(model, tokenizer, rows: list[list[int]], stops: list[str], max_new_tokens: int,
                  eos_id: int | None) -> list[str]:
    device = _model_device(model)
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):  # left padding
        ids[r, width - len(row):] = torch.tensor(row)
        mask[r, width - len(row):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    nxt = out.logits[:, -1].argmax(-1)
    pos = pos[:, -1]
    generated: list[list[int]] = [[] for _ in rows]
    texts = [""] * len(rows)
    active = list(range(len(rows)))  # row index of each batch position
    for step in range(max_new_tokens):
        keep = []
        for b, r in enumerate(active):
            tok = int(nxt[b])
            if tok == eos_id:
                continue
            generated[r].append(tok)
            texts[r] = tokenizer.decode(generated[r], skip_special_tokens=True)
            if not any(s in texts[r] for s in stops):
                keep.append(b)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(active):
            sel = torch.tensor(keep, device=device)
            cache.batch_select_indices(sel)
            mask, nxt, pos = mask[sel], nxt[sel], pos[sel]
            active = [active[b] for b in keep]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        pos = pos + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos[:, None], past_key_values=cache,
                    use_cache=True)
        nxt = out.logits[:, -1].argmax(-1)
    return texts
