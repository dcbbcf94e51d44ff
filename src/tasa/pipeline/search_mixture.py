"""tasa search-mixture: score calibration mixtures of general and task text, choose one -> mixture.json."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from tasa import schemas
from tasa.artifacts import write_json_atomic
from tasa.config import MixtureSpec, Runtime
from tasa.errors import TasaError
from tasa.models import LoadedModel, resolve
from tasa.pipeline.common import check_new_dir, dtype_name, machine_info, model_of, now, resolve_group_size
@dataclass(frozen=True)
class MixtureResult:
    """A finished search: its directory and the mixture.json record (grid, every criterion's values, the chosen
    weights and their ``--calib`` string)."""

    output_dir: Path
    record: dict = field(repr=False)

    @property
    def calib(self) -> str:
        return self.record["calib"]


def search_mixture(model: str | LoadedModel, output_dir: str | Path, spec: MixtureSpec = MixtureSpec(),
                   runtime: Runtime = Runtime(), report: bool = True) -> MixtureResult:
    """Score calibration mixtures of ``spec.general`` and ``spec.tasks`` by training-free criteria (or measured
    GPTQ quality on held-out task rows) and choose one; writes ``mixture.json`` (and a report) in ``output_dir``.

    The first of ``spec.criteria`` chooses; the others are computed alongside for comparison.  See
    tasa.mixture.search for the token sets and the criteria.  ``spec.ratios`` are general-text shares (default
    0, 1/8, 1/4, 1/2, 3/4, 7/8, 1), the task sources sharing the rest equally; with ``spec.grid_step`` the grid
    is the simplex over all sources instead.  Measured points are stored as they finish, so a killed search
    resumes.
    """
    from tasa.mixture.search import search

    out = check_new_dir(output_dir)
    t0 = time.perf_counter()
    lm, model = model_of(model, runtime)
    if lm.max_length is not None and spec.seqlen > lm.max_length:
        raise TasaError(f"seqlen {spec.seqlen} exceeds the model's maximum context of {lm.max_length} tokens")
    group_size = resolve_group_size(resolve(lm.model), spec.group_size)
    run_points = None
    if runtime.cluster.backend is not None and "measured" in spec.criteria:  # the measured points: Ray tasks
        from tasa.distributed.cluster import ModelSource
        from tasa.distributed.tasks import ray_map
        from tasa.mixture.search import measure_point

        run_points = ray_map(runtime.cluster, ModelSource.of(lm, resolve(lm.model)), measure_point,
                             "measured points", runtime.progress)
    s = search(lm, lambda: model_of(model, runtime)[0], spec, group_size, runtime, out_dir=out,
               run_points=run_points)
    s.update({"model": model, "dtype": dtype_name(lm.model), "machine": machine_info(), "date": now()})
    s["seconds"]["with_loading"] = time.perf_counter() - t0
    s = schemas.Mixture.from_dict(s).to_dict()  # the typed record is what is written
    write_json_atomic(out / "mixture.json", s)
    if report:
        from tasa.report.mixture_report import write_report

        write_report(out / "mixture.json")
    return MixtureResult(out, s)
