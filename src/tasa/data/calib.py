"""Calibration sets: N sequences of T tokens from one source or a weighted mixture.

For each source the texts are (for row sources, after a seeded shuffle)
tokenised and concatenated into one token stream, separated by a blank line;
the stream is cut into non-overlapping T-token windows and the source's share
of the N sequences is drawn from those windows without replacement, seeded.
Shares follow the weights by largest-remainder rounding, so
``wikitext2:0.5,gsm8k:0.5`` with N=128 gives exactly 64 + 64.
"""
from __future__ import annotations

import hashlib
import logging
import math
import random
from dataclasses import dataclass

import torch

from tasa.config import CalibSpec
from tasa.data.sources import TextSource, resolve_calibration_source
from tasa.errors import TasaError

log = logging.getLogger(__name__)

SEPARATOR = "\n\n"


@dataclass
class CalibrationSet:
    input_ids: torch.Tensor  # (nsamples, seqlen) int64
    counts: dict[str, int]  # source -> sequences taken
    spec: CalibSpec


def apportion(weights: list[float], total: int) -> list[int]:
    """Split ``total`` items by ``weights`` with largest-remainder rounding (ties: earlier first)."""
    wsum = sum(weights)
    exact = [w / wsum * total for w in weights]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def token_windows(tokenizer, texts: list[str], seqlen: int) -> torch.Tensor:
    """Concatenate texts (separated by a blank line) into a stream; cut into (n, seqlen) windows."""
    joined = SEPARATOR.join(t for t in texts if t)
    ids = tokenizer(joined, add_special_tokens=False, return_tensors="pt").input_ids[0]
    n = ids.numel() // seqlen
    return ids[: n * seqlen].view(n, seqlen)


def sample_source(tokenizer, source: TextSource, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """``n`` seeded, distinct windows of ``seqlen`` tokens from one source."""
    texts = source.load()
    rng = random.Random(f"{seed}:{source.name}")
    if source.kind == "rows":
        texts = list(texts)
        rng.shuffle(texts)
    windows = token_windows(tokenizer, texts, seqlen)
    if windows.shape[0] < n:
        raise TasaError(
            f"calibration source {source.name!r} yields only {windows.shape[0]} windows of {seqlen} tokens; "
            f"{n} requested (lower --nsamples or --seqlen, or add another source)"
        )
    picks = sorted(rng.sample(range(windows.shape[0]), n))
    return windows[picks]


def build_calibration(tokenizer, spec: CalibSpec, max_length: int | None = None) -> CalibrationSet:
    """Build the (nsamples, seqlen) calibration token tensor described by ``spec``."""
    names = [n for n, _ in spec.sources]
    if len(set(names)) != len(names):
        raise TasaError(f"calibration source listed twice in {spec.describe()!r}")
    sources = [resolve_calibration_source(n) for n in names]
    return mix_sources(tokenizer, sources, [w for _, w in spec.sources], spec, max_length)


def mix_sources(tokenizer, sources: list[TextSource], weights: list[float], spec: CalibSpec,
                max_length: int | None = None) -> CalibrationSet:
    """``spec.nsamples`` windows of ``spec.seqlen`` tokens, shared among resolved sources by weight, shuffled."""
    if max_length is not None and spec.seqlen > max_length:
        raise TasaError(f"seqlen {spec.seqlen} exceeds the model's maximum context of {max_length} tokens")
    counts = apportion(weights, spec.nsamples)
    blocks = []
    for src, n in zip(sources, counts):
        if n:
            blocks.append(sample_source(tokenizer, src, n, spec.seqlen, spec.seed))
    ids = torch.cat(blocks)
    perm = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(spec.seed))
    return CalibrationSet(ids[perm], {s.name: n for s, n in zip(sources, counts)}, spec)


def _heldout_hash(seed: int, text: str) -> float:
    digest = hashlib.blake2b(f"{seed}\x00{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def split_heldout(source: TextSource, fraction: float, seed: int) -> tuple[TextSource, TextSource]:
    """Split a row source into (calibration rows, held-out rows), disjoint by content.

    A row is held out when a seeded hash of its text falls below ``fraction``, so
    identical rows always land on the same side and the split does not depend on
    row order.  Only row sources can be split (a single document cannot).
    """
    if source.kind != "rows":
        raise TasaError(f"source {source.name!r} is one document; held-out rows need a row source "
                        "(gsm8k, arc_easy, a .jsonl file ...)")
    if not 0.0 < fraction < 1.0:
        raise TasaError(f"held-out fraction must be in (0, 1), got {fraction}")

    def part(held: bool):
        def load() -> list[str]:
            return [t for t in source.load() if (_heldout_hash(seed, t) < fraction) == held]
        return load

    return (TextSource(source.name, "rows", part(False)),
            TextSource(f"{source.name}#heldout", "rows", part(True)))
