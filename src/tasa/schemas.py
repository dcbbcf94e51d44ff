"""tasa's JSON artifacts: their schema identifiers, declared once (writers stamp them, readers check them;
a change of layout that old readers would misread bumps the version here), and the typed records read
from them.  Torch-free: the allocation reads profiles through it."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from tasa.errors import TasaError

SENSITIVITY = "tasa.sensitivity/1"  # profile/sensitivity.json (tasa profile)
MIXTURE = "tasa.mixture/1"  # mixture/mixture.json (tasa search-mixture)


def check(record: dict, schema: str, what: str) -> None:
    """Refuse ``record`` unless it carries ``schema``."""
    if record.get("schema") != schema:
        raise TasaError(f"{what} is not a {schema} record (schema {record.get('schema')!r})")


@dataclass(frozen=True)
class ProfileUnit:
    """One probed unit of a profile: a decoder layer or a linear module."""

    name: str
    layer: int
    modules: tuple[str, ...]
    numel: int


@dataclass
class Sensitivity:
    """A sensitivity profile (``sensitivity.json``, written by tasa profile, read by tasa allocate and the
    reports): per unit, objective and bit-width, the cost of quantizing that unit alone, with its interval.

    ``costs[objective][str(bits)]`` = {"cost": [...], "ci_low": [...], "ci_high": [...]}, unit order.  Every
    other recorded field (settings, stability, timings ...) is kept as written in ``extra``."""

    granularity: str
    bits: list[int]
    group_size: int
    units: list[ProfileUnit]
    costs: dict[str, dict[str, dict[str, list[float]]]]
    model: str | None = None
    sym: bool = True
    fusion_groups: list[tuple[str, ...]] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    REQUIRED = ("granularity", "bits", "group_size", "units", "costs")

    @classmethod
    def from_dict(cls, d: dict, what: str = "the sensitivity profile") -> "Sensitivity":
        check(d, SENSITIVITY, what)
        missing = [k for k in cls.REQUIRED if k not in d]
        if missing:
            raise TasaError(f"{what} lacks {', '.join(missing)}")
        try:
            units = [ProfileUnit(str(u["name"]), int(u["layer"]), tuple(u["modules"]), int(u["numel"]))
                     for u in d["units"]]
        except (KeyError, TypeError, ValueError) as e:
            raise TasaError(f"{what} has a malformed unit ({e})") from None
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(granularity=d["granularity"], bits=[int(b) for b in d["bits"]], group_size=int(d["group_size"]),
                   units=units, costs=d["costs"], model=d.get("model"), sym=bool(d.get("sym", True)),
                   fusion_groups=[tuple(g) for g in d.get("fusion_groups", [])],
                   extra={k: v for k, v in d.items() if k not in known and k != "schema"})

    def to_dict(self) -> dict:
        return {"schema": SENSITIVITY, "model": self.model, "granularity": self.granularity, "bits": self.bits,
                "group_size": self.group_size, "sym": self.sym,
                "units": [{"name": u.name, "layer": u.layer, "modules": list(u.modules), "numel": u.numel}
                          for u in self.units],
                "fusion_groups": [list(g) for g in self.fusion_groups], "costs": self.costs, **self.extra}

    def cost(self, objective: str, bits: int) -> list[float]:
        return self.costs[objective][str(bits)]["cost"]

    @property
    def sizes(self) -> list[int]:
        return [u.numel for u in self.units]


def sensitivity(record: "dict | Sensitivity", what: str = "the sensitivity profile") -> Sensitivity:
    """``record`` as a :class:`Sensitivity` (a dict is checked and converted)."""
    return record if isinstance(record, Sensitivity) else Sensitivity.from_dict(record, what)
