"""tasa's JSON artifacts: their schema identifiers, declared once (writers stamp them, readers check them;
a change of layout that old readers would misread bumps the version here), and the typed records read
from them.  Torch-free: the allocation reads profiles through it."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from tasa.errors import TasaError

SENSITIVITY = "tasa.sensitivity/1"  # profile/sensitivity.json (tasa profile)
MIXTURE = "tasa.mixture/1"  # mixture/mixture.json (tasa search-mixture)
EVALUATION = "tasa.eval/1"  # results JSON of tasa eval (eval-fp.json, eval-quant.json of a run); unstamped before
STAGES = "tasa.stages/1"  # stages.json of a tasa run (tasa.stages); before 2026-12-04 a bare map of stage records
PLAN_VERSION = 1  # plan.json's "version" (tasa.plan)


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
    in_features: tuple[int, ...] | None = None  # each module's input width (profiles before 2026-12-04: None)


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
            units = [ProfileUnit(str(u["name"]), int(u["layer"]), tuple(u["modules"]), int(u["numel"]),
                                 tuple(int(w) for w in u["in_features"]) if u.get("in_features") else None)
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
                "units": [{"name": u.name, "layer": u.layer, "modules": list(u.modules), "numel": u.numel,
                           **({"in_features": list(u.in_features)} if u.in_features else {})} for u in self.units],
                "fusion_groups": [list(g) for g in self.fusion_groups], "costs": self.costs, **self.extra}

    def cost(self, objective: str, bits: int) -> list[float]:
        return self.costs[objective][str(bits)]["cost"]

    @property
    def sizes(self) -> list[int]:
        return [u.numel for u in self.units]


def sensitivity(record: "dict | Sensitivity", what: str = "the sensitivity profile") -> Sensitivity:
    """``record`` as a :class:`Sensitivity` (a dict is checked and converted)."""
    return record if isinstance(record, Sensitivity) else Sensitivity.from_dict(record, what)


@dataclass
class StageRecord:
    """One stage of a ``tasa run`` in stages.json: the hash of its inputs, the inputs, whether it finished, its
    small result and its seconds."""

    key: str
    inputs: dict
    done: bool = False
    result: dict | None = None
    seconds: float | None = None

    @classmethod
    def from_dict(cls, d: dict, what: str = "a stage record") -> "StageRecord":
        try:
            return cls(key=str(d["key"]), inputs=dict(d["inputs"]), done=bool(d.get("done", False)),
                       result=d.get("result"), seconds=None if d.get("seconds") is None else float(d["seconds"]))
        except (KeyError, TypeError, ValueError) as e:
            raise TasaError(f"{what} is malformed ({e})") from None

    def to_dict(self) -> dict:
        out = {"key": self.key, "inputs": self.inputs, "done": self.done}
        if self.done:
            out.update(result=self.result, seconds=self.seconds)
        return out


def stage_records(record: dict, what: str = "stages.json") -> dict[str, StageRecord]:
    """The stage records of a stages.json: ``{"schema": STAGES, "stages": {name: record}}``, or the bare map
    written before the schema was stamped."""
    if not isinstance(record, dict):
        raise TasaError(f"{what} is not a JSON object")
    if "schema" in record:
        check(record, STAGES, what)
        record = record.get("stages", {})
        if not isinstance(record, dict):
            raise TasaError(f"{what}: 'stages' is not a JSON object")
    return {name: StageRecord.from_dict(r, f"{what}: stage {name}") for name, r in record.items()}


def stages_dict(records: dict[str, StageRecord]) -> dict:
    """stages.json's content for ``records``."""
    return {"schema": STAGES, "stages": {name: r.to_dict() for name, r in records.items()}}


@dataclass
class Mixture:
    """A calibration-mixture search (``mixture.json``, written by tasa search-mixture, read by its report and by
    tasa run): the sources, the grid of weights, every criterion's values, and the chosen weights with their
    ``--calib`` string.  Every other recorded field (token-set sizes, seconds, machine ...) is kept in ``extra``."""

    general: str
    tasks: list[str]
    targets: list[str]
    criteria: list[str]
    sources: list[str]
    grid: list[list[float]]
    results: dict[str, dict]
    chosen: list[float]
    calib: str
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, what: str = "the mixture search") -> "Mixture":
        check(d, MIXTURE, what)
        names = [f.name for f in fields(cls) if f.name != "extra"]
        missing = [k for k in names if k not in d]
        if missing:
            raise TasaError(f"{what} lacks {', '.join(missing)}")
        if not all(len(w) == len(d["sources"]) for w in d["grid"]) or \
                any(len(r.get("values", [])) != len(d["grid"]) for r in d["results"].values()):
            raise TasaError(f"{what}: its grid, sources and criterion values do not match in length")
        return cls(**{k: d[k] for k in names}, extra={k: v for k, v in d.items() if k not in names and k != "schema"})

    def to_dict(self) -> dict:
        return {"schema": MIXTURE, **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"},
                **self.extra}


@dataclass
class Evaluation:
    """An evaluation (tasa eval's results JSON): the model, the settings, metrics per task, and per-item
    ``samples`` when logged (a later run's reference).  Every other recorded field is kept in ``extra``."""

    model: str
    config: dict
    results: dict[str, dict]
    samples: dict | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, what: str = "the evaluation") -> "Evaluation":
        if not isinstance(d, dict):
            raise TasaError(f"{what} is not a JSON object")
        if "schema" in d:  # records written before 2026-12-04 carry none
            check(d, EVALUATION, what)
        missing = [k for k in ("model", "config", "results") if k not in d]
        if missing:
            raise TasaError(f"{what} lacks {', '.join(missing)}")
        if not isinstance(d["results"], dict):
            raise TasaError(f"{what}: 'results' is not a JSON object")
        known = ("schema", "model", "config", "results", "samples")
        return cls(str(d["model"]), dict(d["config"]), d["results"], d.get("samples"),
                   {k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict:
        return {"schema": EVALUATION, "model": self.model, "config": self.config, "results": self.results,
                **self.extra, **({} if self.samples is None else {"samples": self.samples})}
