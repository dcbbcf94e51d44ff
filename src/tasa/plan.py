"""The per-module quantization plan: an ordered ``{module name -> QuantSpec}``.

A plan is the single object that says what happens to every linear module.
Modules absent from the plan stay in full precision; ``tasa quantize`` refuses a plan
that leaves out any of the model's quantizable linears unless told to keep them so.  Plans serialise to JSON
(``plan.json``) and round-trip exactly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from tasa.config import QuantSpec
from tasa.schemas import PLAN_VERSION
from tasa.errors import TasaError

ROLES = ("gate_proj", "up_proj", "down_proj")  # the linears of a routed expert (tasa.models.moe)


def expert_container(local: str) -> str | None:
    """The local name of the RoutedExperts list a linear belongs to (``mlp.experts`` for
    ``mlp.experts.3.down_proj``), else None."""
    parts = local.split(".")
    if len(parts) >= 3 and parts[-2].isdigit() and parts[-1] in ROLES:
        return ".".join(parts[:-2])
    return None


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
    def from_dict(cls, d: dict, where: str = "plan") -> "Plan":
        if not isinstance(d, dict):
            raise TasaError(f"{where}: a plan is a JSON object with 'version' and 'modules', not a {type(d).__name__}")
        if d.get("version") != PLAN_VERSION:
            raise TasaError(f"{where}: unsupported plan version {d.get('version')!r} (expected {PLAN_VERSION})")
        modules = d.get("modules")
        if not isinstance(modules, dict):
            raise TasaError(f"{where}: 'modules' must map module names to quantization specs")
        specs = {}
        for name, spec in modules.items():
            if not isinstance(spec, dict):
                raise TasaError(f"{where}: module {name!r} has spec {spec!r}; expected an object such as "
                                '{"bits": 4, "group_size": 64}')
            try:
                specs[name] = QuantSpec.from_dict(spec)
            except TasaError as e:
                raise TasaError(f"{where}: module {name!r}: {e}") from None
            except TypeError as e:
                raise TasaError(f"{where}: module {name!r}: bad spec ({e})") from None
        meta = d.get("meta", {})
        if not isinstance(meta, dict):
            raise TasaError(f"{where}: 'meta' must be an object")
        return cls(specs, method=d.get("method", "gptq"), meta=meta)

    def coverage(self, names: Iterable[str]) -> tuple[list[str], list[str]]:
        """(missing, extra): the given quantizable modules the plan leaves out, and planned names not among them."""
        names = list(names)
        known = set(names)
        return [n for n in names if n not in self.modules], [n for n in self.modules if n not in known]

    def save(self, path: str | Path) -> None:
        from tasa.artifacts import write_json_atomic

        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if path.is_dir():
            raise TasaError(f"plan {path} is a directory; give its plan.json")
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise TasaError(f"plan file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TasaError(f"plan file {path} is not valid JSON: {e}") from None
        return cls.from_dict(data, where=str(path))
