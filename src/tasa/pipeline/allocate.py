"""tasa allocate: aggregate a profile's objectives and choose bits per unit under a budget -> plan.json."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tasa import schemas
from tasa.artifacts import read_json
from tasa.config import AllocationSpec
from tasa.errors import TasaError
from tasa.pipeline.common import check_output_file
from tasa.schemas import Sensitivity


@dataclass(frozen=True)
class AllocationResult:
    """A written plan and the allocation's summary (bits per layer, average and effective bits, the profile's
    additive prediction per objective)."""

    output: Path
    summary: dict = field(repr=False)


def read_profile(path: str | Path) -> tuple[Sensitivity, Path]:
    """A sensitivity.json (or the directory holding one), read strictly into its typed record."""
    path = Path(path)
    if path.is_dir():
        path = path / "sensitivity.json"
    if not path.is_file():
        raise TasaError(f"sensitivity file not found: {path}")
    try:
        record = read_json(path)
    except json.JSONDecodeError as e:
        raise TasaError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(record, dict):
        raise TasaError(f"{path} is not a sensitivity profile (a JSON object)")
    return schemas.sensitivity(record, str(path)), path


def allocate_bits(sensitivity: str | Path, output: str | Path, spec: AllocationSpec,
                  module_sensitivity: str | Path | None = None) -> AllocationResult:
    """Aggregate a layer profile, allocate bits per layer under ``spec.budget`` exactly (and split them within
    layers by a module profile), for ``spec.target``; write plan.json."""
    from tasa.allocate.plan import plan_from_sensitivity

    check_output_file(output)
    sens, path = read_profile(sensitivity)
    module_sens = read_profile(module_sensitivity)[0] if module_sensitivity is not None else None
    plan, summary = plan_from_sensitivity(sens, spec.budget, bits=spec.bits, beta=spec.beta,
                                          task_weights=spec.weights,
                                          budget_includes_metadata=spec.budget_includes_metadata, method=spec.method,
                                          target=spec.target, module_sens=module_sens, tie_fused=spec.tie_fused)
    plan.meta["sensitivity"] = str(path)
    plan.save(output)
    summary["output"] = str(output)
    return AllocationResult(Path(output), summary)
