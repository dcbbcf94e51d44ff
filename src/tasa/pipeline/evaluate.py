"""tasa eval: WikiText-2 perplexity and tasks, optionally against a full-precision reference (flip rates, KL)."""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from tasa import schemas
from tasa.artifacts import read_json, write_bytes_atomic, write_json_atomic
from tasa.config import EvalSpec, Runtime
from tasa.data import eval_texts, store
from tasa.errors import TasaError
from tasa.eval.perplexity import perplexity
from tasa.models import LoadedModel
from tasa.pipeline.common import check_output_file, dtype_name, machine_info, model_of, now
log = logging.getLogger("tasa.pipeline")


@dataclass(frozen=True)
class EvalResult:
    """An evaluation: ``record`` is the results JSON (model, config, results per task, samples when logged);
    ``topk`` the wikitext2 top-k log-probs (with ``log_samples``), kept in memory for a later KL comparison."""

    record: dict = field(repr=False)
    topk: dict | None = field(default=None, repr=False)

    @property
    def results(self) -> dict[str, dict]:
        return self.record["results"]


def _load_reference(reference: str, spec: EvalSpec, runtime: Runtime) -> dict:
    """A reference run: a results JSON written with log_samples, or a model spec evaluated here."""
    if reference.endswith(".json"):
        path = Path(reference)
        if not path.is_file():
            raise TasaError(f"reference results not found: {path}")
        ref = schemas.Evaluation.from_dict(read_json(path), str(path)).to_dict()
        if "samples" not in ref:
            raise TasaError(f"{path} has no per-item records; write it with --log-samples")
        topk_path = path.with_suffix(".topk.safetensors")
        if "wikitext2" in spec.tasks:
            if not topk_path.is_file():
                raise TasaError(f"{path} has no top-k log-probs ({topk_path.name}) for the KL divergence; "
                                "evaluate the reference with --tasks wikitext2 --log-samples")
            from safetensors.torch import load_file

            ref["_topk"] = load_file(str(topk_path))
        return ref
    log.info("evaluating the reference model %s", reference)
    res = evaluate(reference, dataclasses.replace(spec, log_samples=True), runtime=runtime)
    return {**res.record, "_topk": res.topk}


def evaluate(model: str | LoadedModel, spec: EvalSpec = EvalSpec(), output: str | Path | None = None,
             reference: str | None = None, runtime: Runtime = Runtime()) -> EvalResult:
    """Evaluate ``model`` on ``spec.tasks`` (built-in names or task spec files).

    With ``reference`` (a model spec, or a results JSON written with ``log_samples``) each task also reports
    flip rates against it and wikitext2 the mean KL divergence from it.  ``output`` writes the JSON (and, with
    ``log_samples`` and wikitext2, ``<output>.topk.safetensors`` holding the top-``kl_topk`` log-probs a later
    run compares against).
    """
    from tasa.eval.runner import Prompting, add_flips, run_task
    from tasa.eval.tasks import get_task

    tasks = list(spec.tasks)
    task_objs = {t: get_task(t) for t in tasks if t != "wikitext2"}  # bad names and specs fail before loading
    for t in task_objs.values():
        t.select(spec.limit)  # reads the rows: missing files and a too-large --limit fail early
    if output is not None:
        check_output_file(output)
    ref = _load_reference(reference, spec, runtime) if reference is not None else None
    t0 = time.perf_counter()
    lm, model = model_of(model, runtime)
    record: dict = {"model": model,
                    "config": {"tasks": tasks, "limit": spec.limit, "windows": spec.windows,
                               "num_fewshot": spec.num_fewshot, "seqlen": spec.seqlen,
                               "batch_size": runtime.batch_size, "device": runtime.device,
                               "dtype": dtype_name(lm.model),
                               "apply_chat_template": spec.apply_chat_template, "generate": spec.generate,
                               "reference": reference, "data": store.fingerprint()},
                    "results": {}, "machine": machine_info(), "date": now()}
    samples: dict = {}
    topk = None
    for name in tasks:
        if name == "wikitext2":
            text = "\n\n".join(eval_texts("wikitext2"))
            r = perplexity(lm.model, lm.tokenizer, text, seqlen=spec.seqlen,
                           limit=spec.windows if spec.windows is not None else spec.limit,
                           batch_size=runtime.batch_size, progress=runtime.progress,
                           topk=spec.kl_topk if spec.log_samples else 0, reference=ref.get("_topk") if ref else None)
            m = {"ppl": r.ppl, "nll": r.nll, "windows": r.windows, "tokens": r.tokens}
            if r.kl is not None:
                m.update({"kl": r.kl, "kl_stderr": r.kl_stderr, "ref_topk_mass": r.ref_topk_mass})
            m["seconds"] = r.seconds
            record["results"]["wikitext2"] = m
            topk = r.topk
            continue
        task = task_objs[name]
        res = run_task(lm.model, lm.tokenizer, task, limit=spec.limit, num_fewshot=spec.num_fewshot,
                       batch_size=runtime.batch_size, generate=spec.generate, progress=runtime.progress,
                       prompting=Prompting(spec.apply_chat_template, spec.prefix_cache))
        if ref is not None:
            if name not in ref.get("samples", {}):
                raise TasaError(f"the reference has no records of task {name}")
            add_flips(res, task, ref["samples"][name])
        record["results"][res.task] = res.metrics
        samples[res.task] = res.samples
    record["seconds"] = time.perf_counter() - t0
    if spec.log_samples:
        record["samples"] = samples
    record = schemas.Evaluation.from_dict(record).to_dict()  # the typed record is what is written
    if output:
        write_json_atomic(output, record)
        if spec.log_samples and topk is not None:
            from safetensors.torch import save

            write_bytes_atomic(Path(output).with_suffix(".topk.safetensors"),
                               save({k: v.contiguous() for k, v in topk.items()}))
    return EvalResult(record, topk if spec.log_samples else None)
