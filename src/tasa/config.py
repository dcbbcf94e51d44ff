"""Typed, validated configuration objects.

Everything here is a frozen dataclass validated on construction, so an invalid
setting fails where it is written, not deep inside a quantizer.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from tasa.errors import TasaError

MIN_BITS = 2
MAX_BITS = 8


@dataclass(frozen=True)
class QuantSpec:
    """How one linear module is quantized.

    bits:        weight bit-width, 2..8.
    group_size:  columns (input features) sharing one scale/zero; -1 = one group per row.
    sym:         symmetric grid (zero point fixed at the middle of the range, GPTQ convention).
    act_order:   GPTQ: process columns in order of decreasing Hessian diagonal.
    static_groups: GPTQ with act_order: compute all group grids before quantizing,
                 so group membership follows the original column order (exportable
                 with a trivial g_idx).
    damp:        GPTQ: dampening added to the Hessian diagonal, as a fraction of its mean.
    block_size:  GPTQ: columns per lazy-batch update.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise TasaError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {self.bits!r}")
        if not isinstance(self.group_size, int) or (self.group_size != -1 and self.group_size < 1):
            raise TasaError(f"group size must be a positive integer or -1 (per channel), got {self.group_size!r}")
        if not 0.0 < self.damp < 1.0:
            raise TasaError(f"damp must be in (0, 1), got {self.damp!r}")
        if self.block_size < 1:
            raise TasaError(f"block size must be positive, got {self.block_size!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise TasaError(f"unknown QuantSpec fields: {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class CalibSpec:
    """Calibration set: N sequences of T tokens drawn from weighted sources."""

    sources: tuple[tuple[str, float], ...] = (("wikitext2", 1.0),)
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.nsamples < 1:
            raise TasaError(f"nsamples must be positive, got {self.nsamples}")
        if self.seqlen < 2:
            raise TasaError(f"seqlen must be at least 2, got {self.seqlen}")
        if not self.sources:
            raise TasaError("calibration needs at least one source")
        for name, w in self.sources:
            if w < 0:
                raise TasaError(f"calibration weight for {name!r} is negative ({w})")
        if sum(w for _, w in self.sources) <= 0:
            raise TasaError("calibration weights sum to zero")

    @classmethod
    def parse(cls, text: str, **kw) -> "CalibSpec":
        """Parse ``"wikitext2:0.5,gsm8k:0.5"`` (a bare name means weight 1)."""
        sources = []
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            name, sep, weight = part.rpartition(":")
            if not sep or not _is_number(weight):
                name, weight = part, "1"
            sources.append((name, float(weight)))
        if not sources:
            raise TasaError(f"empty calibration spec {text!r}")
        return cls(sources=tuple(sources), **kw)

    def describe(self) -> str:
        return ",".join(f"{n}:{w:g}" for n, w in self.sources)


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True
