"""The verbs, one module each, in data-flow order; every CLI verb is one function here.

    search_mixture  calibration mixture of general and task text          (search_mixture.py)
    profile         per-layer / per-module sensitivity on each objective  (profile.py)
    allocate_bits   aggregate objectives, bits per unit under a budget    (allocate.py)
    quantize        GPTQ / RTN by a uniform spec or a plan, export        (quantize.py)
    evaluate        perplexity and tasks against a reference              (evaluate.py)
    run             all of them, resumable, with a report                 (run.py)
    sweep           several plans from one profile, quantized and evaluated (sweep.py)

Each takes the model and paths plus frozen specs from tasa.config (validated on construction) and a Runtime,
and returns a typed result holding the record it wrote.  Shared checks and provenance: common.py.
"""
from tasa.pipeline.allocate import AllocationResult, allocate_bits
from tasa.pipeline.evaluate import EvalResult, evaluate
from tasa.pipeline.profile import ProfileResult, profile
from tasa.pipeline.quantize import QuantizeResult, quantize
from tasa.pipeline.run import RunResult, run
from tasa.pipeline.search_mixture import MixtureResult, search_mixture
from tasa.pipeline.sweep import SweepResult, sweep

__all__ = ["AllocationResult", "EvalResult", "MixtureResult", "ProfileResult", "QuantizeResult", "RunResult",
           "SweepResult", "allocate_bits", "evaluate", "profile", "quantize", "run", "search_mixture", "sweep"]
