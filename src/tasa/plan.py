"""The per-module quantization plan: an ordered ``{module name -> QuantSpec}``.

A plan is the single object that says what happens to every linear module.
Modules absent from the plan stay in full precision.  Plans serialise to JSON
(``plan.json``) and round-trip exactly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from tasa.config import QuantSpec
from tasa.errors import TasaError

PLAN_VERSION = 1


@dataclass
class Plan:
    modules: dict[str, QuantSpec] = field(default_factory=dict)
    method: str = "gptq"  # "gptq" or "rtn"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in ("gptq", "rtn"):
            raise TasaError(f"unknown quantization method {self.method!r} (use gptq or rtn)")

    @classmethod
    def uniform(cls, names: Iterable[str], spec: QuantSpec, method: str = "gptq", **meta) -> "Plan":
        return cls({n: spec for n in names}, method=method, meta=dict(meta))

    def __contains__(self, name: str) -> bool:
        return name in self.modules

    def __getitem__(self, name: str) -> QuantSpec:
        return self.modules[name]

    def __len__(self) -> int:
        return len(self.modules)

    def average_bits(self, numels: Mapping[str, int]) -> float:
        """Parameter-weighted average weight bits over the planned modules."""
        missing = [n for n in self.modules if n not in numels]
        if missing:
            raise TasaError(f"no size known for planned module {missing[0]!r}")
        total = sum(numels[n] for n in self.modules)
        if total == 0:
            return 0.0
        return sum(numels[n] * s.bits for n, s in self.modules.items()) / total

    def to_dict(self) -> dict:
        return {
            "version": PLAN_VERSION,
            "method": self.method,
            "meta": self.meta,
            "modules": {n: s.to_dict() for n, s in self.modules.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if d.get("version") != PLAN_VERSION:
            raise TasaError(f"unsupported plan version {d.get('version')!r} (expected {PLAN_VERSION})")
        return cls(
            {n: QuantSpec.from_dict(s) for n, s in d["modules"].items()},
            method=d.get("method", "gptq"),
            meta=d.get("meta", {}),
        )

    def save(self, path: str | Path) -> None:
        from tasa.artifacts import write_json_atomic

        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise TasaError(f"plan file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise TasaError(f"plan file {path} is not valid JSON: {e}") from None
        return cls.from_dict(data)
