"""The paper's main table in shape on SmolLM2-135M, against peers, side by side in one run (issue 8).

    .venv/bin/python benchmarks/paper_table.py                 # everything; resumable
    .venv/bin/python benchmarks/paper_table.py --stage quality # quantize + score every row, no generation
    .venv/bin/python benchmarks/paper_table.py --stage generate # GSM8K 5-shot strict-match (seed-0 models;
                                                                # --seeds 1 for another seed's model)
    .venv/bin/python benchmarks/paper_table.py --stage report   # tables and figures from what is cached

Every (row, calibration seed) is quantized and scored in a fresh process; its record (scores, times,
bits; a few KB) is written atomically to benchmarks/results/paper_table/ and committed, so a killed run
or a fresh checkout resumes at the first row not yet measured. Re-derivable inputs (profiles,
calibration tokens, the FP reference log-probs, peer weights) live in benchmarks/.work/paper_table.

Setup: group size 64, symmetric (tasa's signed-max grid since 2026-11-25), GPTQ damp 0.01,
128 x 512-token calibration built by tasa (seed s) and fed identically to every quantizer that
takes calibration. Calibrations: ``wiki`` (WikiText-2 validation; the baselines' convention),
``task`` (gsm8k:0.5,arc_easy:0.5, the tasks' train rows), ``searched`` (``tasa search-mixture``
with its default criterion, grad-align, over WikiText-2 and both tasks; 64 x 512 tokens per
source, as ``tasa run --calib auto``), ``mix`` (wikitext2:0.5,gsm8k:0.25,arc_easy:0.25: half general text, the
calibration trade-off of issue 38), ``mix75`` (wikitext2:0.75,gsm8k:0.125,arc_easy:0.125: the trade-off's next point).
The layer profile is the 4,096-token measured profile of benchmarks/profile.py (wikitext2, gsm8k,
arc_easy; KL cost for ARC-Easy; bits 3, 4, 8).

Rows: FP; RTN W3/W4; tasa GPTQ W3/W4 (wiki, and on the searched calibration); GPTQModel 7.6.0
W3/W4 (wiki); AutoRound 0.16 AutoScheme at 3.5 average bits over W3/W4/W8 g64 quantized by
AutoRound (its defaults: 200 tuning steps, AutoScheme's own 16 x 256 scoring samples, both from
the wiki calibration text), and the same per-module choice quantized by tasa's GPTQ (wiki); the
ppl-only allocation (measured perplexity sensitivities alone, beta 1; wiki) and TASA (beta 0.5)
at budgets 3.0, 3.25, 3.5, 3.75, 4.0 (searched calibration), and TASA 3.5 on task-only and
general-only calibration. A row whose model is another row's, bit for bit, reuses that row's record
(same_model_as): the searched rows when the search chose task-only, and the 3.0-bit allocations,
whose only plan within budget over {3, 4, 8} is uniform W3 (uniform GPTQ W3 on the same calibration).

Quantizer rows (issue 38): ``KIND+TAG-...`` is row ``KIND-...`` quantized with the options QUANTIZERS[TAG] (``ss``:
GPTQ with ``--scale-search 16``; ``lr``: learned rounding, 32 steps per layer, from that grid; ``best``: GPTQ with
act-order, static groups and ``--scale-search 16``, `tasa quantize`'s default since 2026-12-04; ``ft``: that with
``--float-targets 0.25``; ``gl``: ``ft``'s GPTQ, each layer's result then refined by 32 steps of learned rounding,
``--learn-start gptq``, also on uniform W3/W4, ``gptq+gl-w3-wiki``, ``gptq+gl-w4-wiki``; ``gl128``, ``gl200``: the
same with 128 and 200 steps, on TASA 3.5 with the mixed calibration (and ``mix75``), and uniform W3/W4; ``gk128``:
``gl128`` with the last layer's learning on the output distribution's KL, ``--learn-output-kl`` (also on the
task-only calibration, ``tasa+gk128-3.5-task``: does the better quantizer still want general text?); ``gk128b2``:
that with 2-sequence batches, ``--batch-size 2``, each learning step on a quarter of the tokens): TASA 3.5 on
the searched calibration and uniform W3/W4 on WikiText-2 (QUANTIZER_ROWS), three seeds like the rows they vary; and
AutoScheme's own per-module choice quantized by tasa's options on WikiText-2 (``asgptq+lr``, ``asgptq+best``: the
rounding compared with AutoRound's at equal plan and calibration); AutoRound's own uniform W3/W4 on WikiText-2
(``autoround-w3-wiki``, ``autoround-w4-wiki``: its defaults, as the AutoScheme rows) and TASA's 3.5-bit plan
quantized by AutoRound on the task calibration and on the mixed one (``artasa-3.5-task``, ``artasa-3.5-mix``: its
per-layer ``layer_config``; the mixed one against ``tasa+ft-3.5-mix`` and ``tasa+lr-3.5-mix`` at equal plan and
calibration).

Experiment (why 3.5 bits lands short of W4, allocation granularity): ``tasamod-3.5-searched`` is TASA
(beta 0.5) allocated over every linear module of the model at once from a module profile of all 30
layers at 3 and 4 bits (same probes, objectives and settings as the layer profile), quantized like the
TASA rows. Its 420 probes take about 2.9 hours here (40-43 s each in the first layers, fewer further
on), so they are written straight into the committed records
(benchmarks/results/paper_table/module-profile/probes, about 47 KB each): a profile killed in one
checkout resumes in the next.

Experiment (RTN probes against the quantizer that is used): ``tasagptq-3.5-searched`` is TASA (beta
0.5) from a layer profile whose probes GPTQ-quantize their layer (``tasa profile --probe-quantizer
gptq``) with Hessians from the row's own calibration (searched, seed 0, 128 x 512), same objectives,
probe rows and bit-widths as the RTN layer profile. It is measured on three calibration seeds like the
3.5-bit rows (its plan is the seed-0 profile's, as the TASA rows' plan is the one layer profile's):
whether it lands nearer W4 than the RTN-profile plan is a difference of a few hundredths of the W4-W3
gap, which one seed cannot settle. The module-granularity row and the budget sweep use seed 0 only.

Scores, on test rows never used for calibration, profiling or search: WikiText-2 perplexity and
KL(FP || quantized) per token (top-256 log-probs) on the first 40 windows of 512 tokens; ARC-Easy
and ARC-Challenge acc and acc_norm on the first 1,000 test rows, zero-shot; GSM8K gold-solution
NLL on the first 250 test rows, zero-shot; GSM8K 5-shot strict-match (greedy, lm-eval's
gsm8k prompt) on the first 250 test rows, for the seed-0 model of each row. The aggregate task
score (0 = chance/uniform, 100 = full precision) is the mean of ARC-Easy acc and acc_norm
retention above chance ((x - 0.25) / (x_FP - 0.25)) and the GSM8K per-token likelihood
retention exp(NLL_FP - NLL); ARC-Challenge and GSM8K strict-match are reported but not
aggregated: SmolLM2-135M scores at chance on them in full precision.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or '.').resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
from benchmarks.common import (GPTQMODEL_REQS, RESULTS, ROOT, WORK, cached, load_linear_weights,  # noqa: E402
                               parse_or_work, peer_venv, row, run_json, score_model, set_weights, wikitext2,
                               write_results)
from tasa.artifacts import write_json_atomic  # noqa: E402

BENCH = "paper_table"
COMMAND = ".venv/bin/python benchmarks/paper_table.py"
GROUP, NSAMPLES, SEQLEN, DAMP, BATCH = 64, 128, 512, 0.01, 8
SEEDS = (0, 1, 2)
BUDGETS = (3.0, 3.25, 3.5, 3.75, 4.0)
SWEEP_SEEDS = (0,)  # budgets other than 3.5, and the module-granularity experiment (tasamod): one calibration seed
LIMITS = {"wikitext2": 40, "arc_easy": 1000, "arc_challenge": 1000, "gsm8k": 250, "gsm8k_5shot": 250}
CALIBS = {"wiki": "wikitext2", "task": "gsm8k:0.5,arc_easy:0.5", "mix": "wikitext2:0.5,gsm8k:0.25,arc_easy:0.25",
          "mix75": "wikitext2:0.75,gsm8k:0.125,arc_easy:0.125"}
PROFILE = WORK / "profile" / "layer" / "sensitivity.json"
# Each row's record (scores, times, bits: a few KB) is committed here, so the table survives the loss of
# benchmarks/.work (a fresh checkout) and a later run resumes from the rows already measured. Heavy,
# re-derivable inputs (profiles, calibration tokens, the FP reference log-probs, peer weights) stay in .work,
# except the module profile's probes (longer than a working session here: see the docstring).
RECORDS = RESULTS / BENCH
# where a worker loads, quantizes and scores its model, in float32 (benchmarks/quantizer_time.py --device); cpu if unset
DEVICE_ENV = "TASA_BENCH_DEVICE"
MODULE_PROFILE = RECORDS / "module-profile"
GPTQ_PROFILE = WORK / BENCH / "gptq-profile"
PROFILES = {"layer": PROFILE.parent, "module": MODULE_PROFILE, "gptq": GPTQ_PROFILE}
PEERS = ("gptqmodel", "autoround", "artasa")  # row kinds whose weights another tool quantizes (artasa: TASA's plan, AutoRound)
AUTOROUND_REQS = ["torch==2.13.0", "transformers==5.23.0", "auto-round==0.16.1"]
BASE_ROWS = ["fp", "rtn-w3", "rtn-w4", "gptq-w3-wiki", "gptq-w4-wiki", "gptqmodel-w3-wiki", "gptqmodel-w4-wiki",
             "gptq-w3-searched", "gptq-w4-searched", "autoround-as3.5-wiki", "asgptq-3.5-wiki",
             "pplonly-3.5-wiki", "tasa-3.5-searched", "tasa-3.5-task", "tasa-3.5-wiki", "tasamod-3.5-searched",
             "tasagptq-3.5-searched"]
# quantizer options of issue 38 (tasa quantize --scale-search N --learn-rounding STEPS), by row tag ('tasa+lr-...')
QUANTIZERS = {"ss": {"scale_search": 16}, "lr": {"scale_search": 16, "learn_rounding": 32},
              "best": {"act_order": True, "static_groups": True, "scale_search": 16},  # the default until 2026-12-05
              "ft": {"act_order": True, "static_groups": True, "scale_search": 16, "float_targets": 0.25},  # since
              "gl": {"act_order": True, "static_groups": True, "scale_search": 16, "float_targets": 0.25,
                     "learn_rounding": 32, "learn_start": "gptq"}}  # ft's GPTQ, each layer then refined 32 steps
# gl with more steps per layer (200: AutoRound's count)
QUANTIZERS.update({f"gl{steps}": {**QUANTIZERS["gl"], "learn_rounding": steps} for steps in (128, 200)})
QUANTIZERS["gk128"] = {**QUANTIZERS["gl128"], "learn_output_kl": True}  # the last layer on the output KL
# gk128 with 2-sequence batches (`--batch-size 2`): each learning step on a quarter of the tokens (GPTQ's Hessians
# and the float targets are the same sums in smaller pieces)
QUANTIZERS["gk128b2"] = {**QUANTIZERS["gk128"], "batch_size": 2}
# gk128b2 computed in bfloat16 (`tasa quantize --dtype bfloat16`: the model's forward passes in bfloat16, its Hessians,
# GPTQ and learned grids in float32), as AutoRound computes on a CPU with bfloat16 (its default `amp` casts the model
# to bfloat16 there); scored, like every row, in float32, its quantized linears holding the weights the bfloat16
# model held (the codes and fp16 scales dequantized and rounded to bfloat16 once, as an engine computing in bfloat16
# dequantizes them)
QUANTIZERS["gk128b2bf"] = {**QUANTIZERS["gk128b2"], "dtype": "bfloat16"}
# quantize_model's arguments (dtype: the model's while it is quantized); the others QuantSpec's
RUN_OPTIONS = ("learn_rounding", "float_targets", "learn_start", "learn_output_kl", "batch_size", "dtype")
QUANTIZER_ROWS = ["tasa+ss-3.5-searched", "tasa+lr-3.5-searched", "gptq+lr-w3-wiki", "gptq+lr-w4-wiki",
                  "asgptq+lr-3.5-wiki", "asgptq+best-3.5-wiki", "tasa+best-3.5-task", "tasa+ft-3.5-task",
                  "tasa+ft-3.5-mix", "tasa+lr-3.5-mix", "tasa+gl-3.5-mix", "gptq+gl-w3-wiki", "gptq+gl-w4-wiki",
                  "tasa+gl128-3.5-mix", "gptq+gl128-w3-wiki", "gptq+gl128-w4-wiki", "tasa+gl200-3.5-mix",
                  "tasa+gl128-3.5-mix75", "tasa+gk128-3.5-mix75", "tasa+gk128b2-3.5-mix75",
                  "tasa+gk128b2bf-3.5-mix75", "tasa+gk128-3.5-task",
                  "gptq+ft-w4-task", "gptq+ft-w3-wiki", "gptq+ft-w4-wiki",
                  "autoround-w3-wiki", "autoround-w4-wiki", "artasa-3.5-task", "artasa-3.5-mix"]
SWEEP_ROWS = [f"{kind}-{b:g}-{cal}" for b in BUDGETS if b != 3.5
              for kind, cal in (("tasa", "searched"), ("pplonly", "wiki"))]


def parse(name: str) -> dict:
    """'tasa-3.5-searched-s1' -> {kind, bits, calib, seed}; 'gptq-w3-wiki' -> bits 3; 'tasa+lr-3.5-task' -> kind
    tasa quantized with the options of QUANTIZERS['lr'] (quantizer 'lr'; None: plain GPTQ)."""
    parts = name.split("-")
    seed = int(parts.pop()[1:]) if len(parts) > 1 and parts[-1][:1] == "s" and parts[-1][1:].isdigit() else 0
    kind, _, quantizer = parts[0].partition("+")
    if kind == "fp":
        return {"kind": "fp", "bits": None, "calib": None, "seed": 0, "base": "fp", "quantizer": None}
    bits = parts[1]
    bits = float(bits[2:]) if bits.startswith("as") else float(bits[1:]) if bits.startswith("w") else float(bits)
    calib = parts[2] if len(parts) > 2 else None
    return {"kind": kind, "bits": bits, "calib": calib, "seed": seed, "base": "-".join(parts),
            "quantizer": quantizer or None}


def tagged(kind: str, p: dict) -> str:
    """``kind`` with the quantizer tag of parsed row ``p``."""
    return kind + (f"+{p['quantizer']}" if p["quantizer"] else "")


def seeds_of(base: str) -> tuple[int, ...]:
    p = parse(base)
    if p["kind"] in ("fp", "rtn"):
        return (0,)
    if (p["kind"] in ("tasa", "pplonly") and p["bits"] != 3.5) or p["kind"] == "tasamod":
        return SWEEP_SEEDS
    return SEEDS


def with_seed(base: str, seed: int) -> str:
    return base if seed == 0 else f"{base}-s{seed}"


# ---------------------------------------------------------------- calibration


def searched_calib(work: Path) -> str:
    """The mixture `tasa run --calib auto` would choose (grad-align, the default), searched once."""
    def search():
        from tasa.pipeline import search_mixture

        want = {"tasks": ["gsm8k", "arc_easy"], "nsamples": 64, "seqlen": SEQLEN, "seed": 0,
                "criteria": ["grad-align"]}
        done = work / "search" / "mixture.json"  # e.g. a `tasa run --calib auto` mixture/ directory, same settings
        if done.is_file():
            s = json.loads(done.read_text())
            if any(s.get(k) != v for k, v in want.items()):
                raise SystemExit(f"{done} was searched with other settings than {want}")
        else:
            from tasa.config import MixtureSpec, Runtime

            s = search_mixture("smollm2-135m", work / "search", MixtureSpec(
                general="wikitext2", tasks=tuple(want["tasks"]), criteria=tuple(want["criteria"]),
                nsamples=want["nsamples"], seqlen=SEQLEN, group_size=GROUP, seed=want["seed"]),
                Runtime(batch_size=4, progress=False)).record
        return {"calib": s["calib"], "criteria": s["criteria"], "grid": s["grid"],
                "values": s["results"][s["criteria"][0]]["values"], "seconds": s["seconds"]}

    return cached(RECORDS / "search.json", search)["calib"]


def calib_string(kind: str, work: Path) -> str:
    return searched_calib(work) if kind == "searched" else CALIBS[kind]


def calib_file(work: Path, kind: str, seed: int) -> Path:
    """Token file of a calibration; a searched mixture equal to a fixed one shares its file."""
    spec = calib_string(kind, work)
    for k, v in CALIBS.items():
        if v == spec:
            kind = k
    return work / "calib" / f"{kind}-s{seed}.pt"


def build_calib(work: Path, kind: str, seed: int) -> Path:
    path = calib_file(work, kind, seed)
    if not path.is_file():
        import io

        import torch

        from tasa.artifacts import write_bytes_atomic
        from tasa.config import CalibSpec
        from tasa.data import build_calibration
        from tasa.models import load

        lm = load("smollm2-135m")
        cal = build_calibration(lm.tokenizer, CalibSpec.parse(calib_string(kind, work), nsamples=NSAMPLES,
                                                              seqlen=SEQLEN, seed=seed))
        buf = io.BytesIO()
        torch.save(cal.input_ids, buf)
        write_bytes_atomic(path, buf.getvalue())
    return path


def same_model_as(name: str, work: Path) -> str | None:
    """The row whose model this row's is, token for token and bit for bit, or None: a searched-calibration
    row whose mixture equals task-only is the task-only row, and an allocated row whose plan is uniform
    (every module at b bits: TASA and ppl-only at 3.0) is uniform GPTQ at b bits on its calibration and seed.
    Reusing the twin's record saves a quantization and scoring run with the same result."""
    twin = None
    while True:
        p = parse(name)
        if p["calib"] == "searched" and calib_string("searched", work) == CALIBS["task"]:
            name = name.replace("-searched", "-task")
        elif p["kind"] in ("tasa", "pplonly", "tasamod", "tasagptq") and (b := uniform_bits(name)) is not None:
            name = with_seed(f"{tagged('gptq', p)}-w{b}-{p['calib']}", p["seed"])
        else:
            return twin
        twin = name


def uniform_bits(name: str) -> int | None:
    """b when an allocated row's plan is uniform GPTQ at b bits with the uniform rows' settings, else None
    (also while its profile is not measured yet)."""
    from tasa.config import QuantSpec

    if sensitivity(ALLOCATED_FROM.get(parse(name)["kind"], TASA_LAYER)[0]) is None:
        return None
    plan = allocation(name)[0]
    specs = set(plan.modules.values())
    if plan.method != "gptq" or len(specs) != 1:
        return None
    (spec,) = specs
    return spec.bits if spec == QuantSpec(bits=spec.bits, group_size=GROUP, damp=DAMP) else None


# ---------------------------------------------------------------- scoring


def strict_match(lm) -> dict:
    from tasa.eval.runner import run_task
    from tasa.eval.tasks import get_task

    res = run_task(lm.model, lm.tokenizer, get_task("gsm8k"), limit=LIMITS["gsm8k_5shot"], num_fewshot=5,
                   generate=True, gold_nll=False, progress=False)
    return {"gsm8k_strict_match": res.metrics["strict_match"],
            "gsm8k_strict_match_stderr": res.metrics["strict_match_stderr"],
            "gsm8k_flexible_extract": res.metrics["flexible_extract"], "seconds": res.metrics["seconds"]}


def aggregate(m: dict, fp: dict) -> float:
    """Mean retention of FP quality on the metrics that carry signal on this model (x 100)."""
    acc = [(m[k] - 0.25) / (fp[k] - 0.25) for k in ("arc_easy_acc", "arc_easy_acc_norm")]
    return 100 * statistics.mean([*acc, math.exp(fp["gsm8k_gold_nll"] - m["gsm8k_gold_nll"])])


# ---------------------------------------------------------------- plans


def plan_for(name: str, arch, work: Path):
    from tasa.config import QuantSpec
    from tasa.plan import Plan

    p = parse(name)
    names = [m.name for m in arch.modules]
    if p["kind"] in ("rtn", "gptq"):
        return Plan.uniform(names, QuantSpec(bits=int(p["bits"]), group_size=GROUP, damp=DAMP), method=p["kind"])
    if p["kind"] == "asgptq":  # AutoScheme's per-module choice, from AutoRound's run on the same seed
        return autoscheme_plan(with_seed("autoround-as3.5-wiki", p["seed"]), names, work)
    return allocation(name)[0]


def sensitivity(part: str) -> dict | None:
    """The profile ("layer", "module" or "gptq") rows are allocated from, as committed with the rows
    (benchmarks/results/paper_table/PART-sensitivity.json): copied there from its profile directory the
    first time it is read, so a later checkout allocates the same plans without profiling again (the module
    profile's directory is itself committed, module-profile/sensitivity.json). None
    if neither exists; a profile measured on another quantization grid than tasa's is refused."""
    from tasa.quant.rtn import SYM_GRID

    rec, src = RECORDS / f"{part}-sensitivity.json", PROFILES[part] / "sensitivity.json"
    path = rec if rec.is_file() else src if src.is_file() else None
    if path is None:
        return None
    sens = json.loads(path.read_text())
    if sens.get("grid") != SYM_GRID:
        raise SystemExit(f"{path} was profiled on another quantization grid than tasa's ({SYM_GRID}): "
                         "remove it (and its probes) to profile again")
    if path == src and not src.is_relative_to(RECORDS):
        write_json_atomic(rec, sens)
    return sens


# row kind -> (profile it is allocated from, bit-widths, beta); every other allocated kind is TASA from the layer profile
TASA_LAYER = ("layer", [3, 4, 8], 0.5)  # (profile, bit-widths, beta) of the TASA rows
ALLOCATED_FROM = {"pplonly": ("layer", [3, 4, 8], 1.0), "tasagptq": ("gptq", [3, 4, 8], 0.5),
                  "tasamod": ("module", [3, 4], 0.5)}  # module profile: 3 and 4 bits, every module at once


def allocation(name: str):
    """(plan, summary) of an allocated row (ppl-only, TASA and the TASA experiments) from its profile; group
    size 64 like every row, GPTQ damp 0.01 is QuantSpec's default."""
    from tasa.allocate.plan import plan_from_sensitivity

    part, bits, beta = ALLOCATED_FROM.get(parse(name)["kind"], TASA_LAYER)
    sens = sensitivity(part)
    if sens is None:
        raise SystemExit(f"{PROFILES[part]} holds no finished profile: run "
                         + ("benchmarks/profile.py first (the measured layer profile)" if part == "layer"
                            else f"this benchmark's {name} row, which profiles first"))
    return plan_from_sensitivity(sens, parse(name)["bits"], bits=bits, beta=beta)


def autoscheme(name: str) -> bool:
    """Whether row ``name`` is AutoRound at AutoScheme's bits ('autoround-as3.5-wiki'; 'autoround-w4-wiki' is
    AutoRound's own uniform W4)."""
    return parse(name)["kind"] == "autoround" and name.split("-")[1].startswith("as")


def autoscheme_plan(autoround_row: str, names: list[str], work: Path):
    """The bits AutoScheme chose for every linear in an AutoRound row, as a plan."""
    from tasa.config import QuantSpec
    from tasa.plan import Plan

    bits = json.loads((RECORDS / f"{autoround_row}-scheme.json").read_text())["bits"]
    if set(bits) != set(names):
        raise RuntimeError(f"AutoScheme chose bits for {len(bits)} modules, the model has {len(names)}")
    return Plan({n: QuantSpec(bits=bits[n], group_size=GROUP, damp=DAMP) for n in names})


def layer_bits(plan, arch) -> list[float]:
    numels = arch.numels()
    return [sum(numels[m.name] * plan[m.name].bits for m in arch.layer_modules(i))
            / sum(numels[m.name] for m in arch.layer_modules(i)) for i in range(arch.num_layers)]


# ---------------------------------------------------------------- workers


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def worker(name: str, work: Path) -> dict:
    """Quantize (or load a peer's weights) and score one row in this fresh process."""
    import torch

    from tasa.models import load, resolve
    from tasa.quant.apply import quantize_model
    from tasa.quant.rtn import SYM_GRID

    if name == "profile:module":
        return module_profile_worker()
    if name == "profile:gptq":
        return gptq_profile_worker(work)
    device = os.environ.get(DEVICE_ENV, "cpu")
    if name == "fp-reference":  # the FP top-256 log-probs alone (lost with .work; the FP row's record is kept)
        return {"wikitext2_ppl": wikitext2(load("smollm2-135m", dtype="float32", device=device), work, None, LIMITS,
                                           SEQLEN).ppl}
    generate = name.startswith("gen:")
    name = name[4:] if generate else name
    torch.manual_seed(0)
    p = parse(name)
    options = QUANTIZERS[p["quantizer"]] if p["quantizer"] else {}
    compute = options.get("dtype", "float32")  # the model's dtype while it is quantized; scored in float32
    lm = load("smollm2-135m", dtype=compute, device=device)
    arch = resolve(lm.model)
    out: dict = {"seconds": None}
    if p["kind"] in PEERS:
        load_linear_weights(lm, arch, work / "peers" / f"{name}.safetensors")
        if autoscheme(name):
            out["layer_bits"] = layer_bits(autoscheme_plan(name, [m.name for m in arch.modules], work), arch)
        elif p["kind"] == "artasa":
            out["layer_bits"] = layer_bits(allocation(name)[0], arch)
    elif p["kind"] != "fp":
        plan = plan_for(name, arch, work)
        calib = (torch.load(calib_file(work, p["calib"], p["seed"]), weights_only=True)
                 if p["kind"] != "rtn" else None)
        grid_options = {k: v for k, v in options.items() if k not in RUN_OPTIONS}  # QuantSpec fields
        if grid_options:
            plan = dataclasses.replace(plan, modules={n: dataclasses.replace(qs, **grid_options)
                                                      for n, qs in plan.modules.items()})
        t0 = time.perf_counter()
        # the quantized linears' weights as a model not in float32 holds them, for its float32 twin to be scored
        exact: dict = {}
        keep = None if compute == "float32" else \
            (lambda n, r: exact.__setitem__(n + ".weight", r.weight.float().cpu()))
        report = quantize_model(lm.model, arch, plan, calib, batch_size=options.get("batch_size", BATCH),
                                progress=False, on_result=keep,
                                learn_iters=options.get("learn_rounding", 0),
                                float_targets=options.get("float_targets", 0.0),
                                learn_start=options.get("learn_start", "rtn"),
                                learn_output_kl=options.get("learn_output_kl", False), seed=p["seed"])
        if device.startswith("cuda"):  # the GPU's queued work belongs to the quantization's time
            torch.cuda.synchronize()
        out["seconds"] = time.perf_counter() - t0
        out["device"] = device
        out["quantizer"] = options
        if report.layers:  # learned rounding: each layer's calibration loss before and after, and whether it was kept
            out["learning"] = {str(i): dataclasses.asdict(r) for i, r in sorted(report.layers.items())}
        # what the weights also depend on (README "Reproducibility"): the exact calibration tokens and the thread
        # count; recorded like `tasa quantize` records them in quantize.json (rows measured before 2026-12-04 lack them)
        out["calib_sha256"] = None if calib is None else hashlib.sha256(calib.numpy().tobytes()).hexdigest()
        out["threads"] = torch.get_num_threads()
        out["grid"] = SYM_GRID  # records say which grid they measured (rows made on an earlier one were removed)
        out["bits"] = plan.average_bits(arch.numels())
        out["layer_bits"] = layer_bits(plan, arch)
        out["peak_rss_gb"] = peak_rss_gb()
        out["dtype"] = compute
        if compute != "float32":  # scored as every row is: the float32 model, holding those quantized weights
            del lm, arch
            lm = load("smollm2-135m", dtype="float32", device=device)
            arch = resolve(lm.model)
            set_weights(lm, exact)
        del exact
    if generate:
        return strict_match(lm)
    reference = None
    if p["kind"] != "fp":
        from safetensors.torch import load_file

        reference = load_file(str(work / "fp.topk.safetensors"))
    t0 = time.perf_counter()
    out["metrics"] = score_model(lm, work, reference, LIMITS, SEQLEN)
    out["eval_seconds"] = time.perf_counter() - t0
    return out


def module_profile_worker() -> dict:
    """The module profile of every layer at 3 and 4 bits (resumes from its committed probes)."""
    from tasa.pipeline import profile

    from tasa.config import ProfileSpec, Runtime

    s = profile("smollm2-135m", MODULE_PROFILE, ProfileSpec(objectives=("wikitext2", "gsm8k", "arc_easy"), bits=(3, 4),
                granularity="module", group_size=GROUP, probe_tokens=4096), Runtime(progress=False),
                report=False).record
    return {"seconds": s["seconds"], "units": len(s["units"]), "peak_rss_gb": peak_rss_gb()}


def gptq_profile_worker(work: Path) -> dict:
    """The layer profile with GPTQ probes on the searched calibration (resumes from its probes on disk)."""
    from tasa.pipeline import profile

    from tasa.config import CalibSpec, ProfileSpec, Runtime

    calib = CalibSpec.parse(calib_string("searched", work), nsamples=NSAMPLES, seqlen=SEQLEN, seed=0)
    s = profile("smollm2-135m", GPTQ_PROFILE, ProfileSpec(objectives=("wikitext2", "gsm8k", "arc_easy"),
                bits=(3, 4, 8), granularity="layer", group_size=GROUP, probe_tokens=4096, probe_quantizer="gptq",
                calib=calib, damp=DAMP), Runtime(progress=False), report=False).record
    return {"seconds": s["seconds"], "units": len(s["units"]), "peak_rss_gb": peak_rss_gb()}


def quantize_peer(name: str, work: Path, fp_dir: str, python: str | None = None, device: str = "cpu") -> dict:
    """A peer's quantization of row ``name`` in its own process: its fake-quantized weights in work/peers.
    ``python``: AutoRound's interpreter (default: its environment under benchmarks/.work, made once);
    ``device``: where AutoRound computes (its device_map)."""
    p = parse(name)
    dest = work / "peers" / f"{name}.safetensors"
    dest.parent.mkdir(parents=True, exist_ok=True)
    calib = str(calib_file(work, p["calib"], p["seed"]))
    if p["kind"] == "gptqmodel":
        py = peer_venv("gptqmodel", GPTQMODEL_REQS)
        cmd = [str(py), str(_HERE / "peers" / "gptqmodel_quantize.py"), "--model-dir", fp_dir, "--calib", calib,
               "--bits", str(int(p["bits"])), "--group-size", str(GROUP), "--damp", str(DAMP),
               "--batch-size", str(BATCH), "--out", str(dest)]
        env = {"GPTQMODEL_CPU_WORKERS": "2", "GPTQ_TORCH_CACHE_WEIGHTS": "1"}
    else:  # AutoRound: at the bits of AutoScheme's choice, uniform, or TASA's plan (artasa)
        if autoscheme(name):
            bits = ["--avg-bits", str(p["bits"]), "--options", "3,4,8"]
        elif p["kind"] == "artasa":
            planned = dest.with_suffix(".plan.json")
            planned.write_text(json.dumps({n: qs.bits for n, qs in allocation(name)[0].modules.items()}))
            bits = ["--layer-bits", str(planned)]
        else:
            bits = ["--bits", str(int(p["bits"]))]
        py = python or peer_venv("autoround", AUTOROUND_REQS)
        cmd = [str(py), str(_HERE / "peers" / "autoround_autoscheme.py"), "--model-dir", fp_dir, "--calib", calib,
               *bits, "--group-size", str(GROUP), "--batch-size", str(BATCH), "--seed", str(42 + p["seed"]),
               "--device-map", device, "--out", str(dest)]
        env = {}
    out = run_json(cmd, env=env, log=work / "logs" / f"{name}-quantize.log")
    scheme = Path(f"{dest}.layers.json")  # AutoScheme's per-module bits: kept with the row's records
    if scheme.is_file():
        write_json_atomic(RECORDS / f"{name}-scheme.json", json.loads(scheme.read_text()))
    return out


# ---------------------------------------------------------------- driver


def fp_reference(work: Path, env: dict | None = None) -> None:
    """The FP model's top-256 WikiText-2 log-probs (the quantized rows' KL reference) in ``work``, computed once by
    a worker (``env``: e.g. its device), and checked against the FP row's recorded perplexity."""
    if (work / "fp.topk.safetensors").is_file():
        return
    ref = run_json([sys.executable, __file__, "--worker", "fp-reference"], env=env,
                   log=work / "logs" / "fp-reference.log")
    fp = json.loads((RECORDS / "fp.json").read_text())["metrics"]["wikitext2_ppl"]
    if abs(ref["wikitext2_ppl"] / fp - 1) > 1e-4:
        raise RuntimeError(f"the FP model now has WikiText-2 ppl {ref['wikitext2_ppl']}, its record {fp}: "
                           "the reference would not match the recorded rows")


def run_row(name: str, work: Path, fp_dir: str, model: bool = False) -> dict:
    """Measure a row unless its record exists. ``model``: also make sure the inputs its model is rebuilt
    from are on disk (a peer's weights live in .work and are lost with it; requantizing them keeps the
    record of the first run)."""
    twin = same_model_as(name, work)
    if twin is not None:
        return run_row(twin, work, fp_dir, model)
    p = parse(name)
    model = model or not (RECORDS / f"{name}.json").is_file()
    if p["calib"]:
        build_calib(work, p["calib"], p["seed"])
    if p["kind"] in PEERS:
        cached(RECORDS / f"{name}-quantize.json", lambda: quantize_peer(name, work, fp_dir))
        if model and not (work / "peers" / f"{name}.safetensors").is_file():
            quantize_peer(name, work, fp_dir)
    if p["kind"] != "fp" and model:
        fp_reference(work)
    if p["kind"] == "asgptq":
        run_row(with_seed("autoround-as3.5-wiki", p["seed"]), work, fp_dir)
    for kind, part in (("tasamod", "module"), ("tasagptq", "gptq")):
        if p["kind"] == kind and model and sensitivity(part) is None:  # resumes from its probes
            write_json_atomic(RECORDS / f"{part}-profile.json", run_json(
                [sys.executable, __file__, "--worker", f"profile:{part}"], log=work / "logs" / f"{part}-profile.log"))
    cached(RECORDS / f"{name}.json", lambda: run_json(
        [sys.executable, __file__, "--worker", name], log=work / "logs" / f"{name}.log"))
    return merged(name, work)


def record(name: str, work: Path) -> dict | None:
    """The merged record of a row, or of the row whose model it is (same_model_as); None if not run."""
    return merged(same_model_as(name, work) or name, work)


def merged(name: str, work: Path) -> dict | None:
    """A row's cached pieces as one record (None if it has not run): the scores, a peer's quantization
    time, bits and peak memory (else tasa's, from the row itself), and the generation scores if run."""
    path = RECORDS / f"{name}.json"
    if not path.is_file():
        return None
    r = json.loads(path.read_text())
    m = dict(r["metrics"])
    peer = RECORDS / f"{name}-quantize.json"
    if peer.is_file():
        q = json.loads(peer.read_text())
        r.update(seconds=q["seconds"], bits=q.get("average_bits", parse(name)["bits"]), peer=q)
        m["peak_rss_gb"] = q["peak_rss_gb"]
    elif "peak_rss_gb" in r:
        m["peak_rss_gb"] = r["peak_rss_gb"]
    gen = RECORDS / f"{name}-gen.json"
    if gen.is_file():
        g = json.loads(gen.read_text())
        m.update({k: v for k, v in g.items() if k != "seconds"})
        r["generate_seconds"] = g.get("seconds")
    r["metrics"] = m
    return r


def run_generation(name: str, work: Path, fp_dir: str) -> dict:
    twin = same_model_as(name, work)
    if twin is not None:
        return run_generation(twin, work, fp_dir)
    run_row(name, work, fp_dir, model=True)  # the model's inputs (peer weights, calibration, AutoScheme choice) exist
    return cached(RECORDS / f"{name}-gen.json", lambda: run_json(
        [sys.executable, __file__, "--worker", f"gen:{name}"], log=work / "logs" / f"{name}-gen.log"))


def options(ap) -> None:
    ap.add_argument("--stage", choices=["all", "quality", "generate", "report"], default="all")
    ap.add_argument("--seeds", default=None, help="calibration seeds to run (default: each row's own: "
                                                   "0,1,2; budget-sweep and module-experiment rows 0; "
                                                   "generation: 0)")


def main() -> None:
    args, work = parse_or_work(__doc__, BENCH, worker, BASE_ROWS + QUANTIZER_ROWS + SWEEP_ROWS, options)
    from tasa.models import load

    fp_dir = str(load("smollm2-135m").path)
    bases = args.rows.split(",")
    unknown = [b for b in bases if b not in BASE_ROWS + QUANTIZER_ROWS + SWEEP_ROWS]
    if unknown:
        raise SystemExit(f"unknown rows: {', '.join(unknown)}")
    wanted = {int(s) for s in args.seeds.split(",")} if args.seeds else None
    run_row("fp", work, fp_dir)
    if args.stage in ("all", "quality"):
        for name in runs(bases, wanted):
            t0 = time.perf_counter()
            r = run_row(name, work, fp_dir)
            print(f"[{BENCH}] {name}: {json.dumps(r['metrics'])} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.stage in ("all", "generate"):  # the seed-0 models unless --seeds names others
        for name in runs(bases, wanted or {0}):
            t0 = time.perf_counter()
            g = run_generation(name, work, fp_dir)
            print(f"[{BENCH}] {name} strict-match {g['gsm8k_strict_match']:.3f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    report(work, BASE_ROWS + QUANTIZER_ROWS + SWEEP_ROWS)  # the whole table, whichever rows ran now


def runs(bases: list[str], seeds: set[int] | None) -> list[str]:
    """The (row, seed) names to run: every row at seed 0 first, then seed 1, ...; each row only at its own
    seeds, and of those only ``seeds`` (None: all)."""
    return [with_seed(base, seed) for seed in sorted({s for b in bases for s in seeds_of(b)})
            if seeds is None or seed in seeds for base in bases if seed in seeds_of(base)]


def summarise(work: Path, bases: list[str]) -> tuple[list[dict], dict, dict]:
    """Result rows (one per row and seed), per-row mean/sd over the seeds that are cached, and the
    metrics of every cached (row, seed) by name."""
    fp = json.loads((RECORDS / "fp.json").read_text())["metrics"]
    rows, table, metrics = [], {}, {}
    for base in bases:
        per_seed = []
        for seed in seeds_of(base):
            name = with_seed(base, seed)
            r = record(name, work)
            if r is None:
                continue
            m = r["metrics"]
            m["aggregate_task_score"] = aggregate(m, fp)
            if r.get("layer_bits"):
                m["layer_bits"] = r["layer_bits"]
            p = parse(name)
            tool = {"gptqmodel": "gptqmodel", "autoround": "auto-round", "artasa": "auto-round",
                    "fp": "none"}.get(p["kind"], "tasa")
            method = {"fp": "fp", "rtn": "rtn", "autoround": "autoround+autoscheme" if autoscheme(name) else "autoround",
                      "artasa": "autoround+tasa-plan"}.get(p["kind"], "gptq")
            if p["quantizer"]:
                q = QUANTIZERS[p["quantizer"]]
                method = ("gptq+" if q.get("learn_start") == "gptq" else "") + \
                    (f"learned-rounding{q['learn_rounding']}" if q.get("learn_rounding") else "gptq") + \
                    ("+act-order+static-groups" if q.get("act_order") else "") + \
                    (f"+scale-search{q['scale_search']}" if q.get("scale_search") else "") + \
                    (f"+float-targets{q['float_targets']}" if q.get("float_targets") else "") + \
                    ("+output-kl" if q.get("learn_output_kl") else "")
            calib = None if p["kind"] in ("fp", "rtn") else \
                f"{calib_string(p['calib'], work)} {NSAMPLES}x{SEQLEN} seed {p['seed']}"
            rows.append(row(name, tool, method, r.get("bits", p["bits"]), None if p["kind"] == "fp" else GROUP,
                            calib, m, r.get("seconds")))
            per_seed.append(m)
            metrics[name] = m
        if per_seed:
            keys = list(dict.fromkeys(k for m in per_seed for k, v in m.items()  # strict-match: the seeds generated
                                      if isinstance(v, float) and not k.endswith("_stderr")))
            table[base] = {"seeds": len(per_seed), **{
                k: {"mean": statistics.mean(x[k] for x in per_seed if k in x),
                    "sd": statistics.stdev([x[k] for x in per_seed if k in x])
                    if sum(k in x for x in per_seed) > 1 else None} for k in keys}}
    return rows, table, metrics


def report(work: Path, bases: list[str]) -> None:
    rows, table, metrics = summarise(work, bases)
    extra = {"settings": {"group_size": GROUP, "nsamples": NSAMPLES, "seqlen": SEQLEN, "damp": DAMP,
                          "seeds": list(SEEDS), "sweep_seeds": list(SWEEP_SEEDS), "eval_limits": LIMITS,
                          "calibrations": {**CALIBS, "searched": calib_string("searched", work)},
                          "profile": str((RECORDS / "layer-sensitivity.json").relative_to(ROOT)),
                          "aggregate": "mean of (acc - 0.25) / (acc_FP - 0.25) for ARC-Easy acc and acc_norm and "
                                       "exp(NLL_FP - NLL) for GSM8K gold NLL, x 100"},
             "table": table, "search": json.loads((RECORDS / "search.json").read_text())}
    extra["wall_times"] = wall_times(work, bases)
    refs = [r for r in dict.fromkeys(f"{tagged('gptq', parse(x))}-w{w}-{parse(x)['calib']}" for x in bases
                                     if parse(x)["calib"]
                                     for w in (4, 3))
            if r not in bases]  # the uniform rows that positions are measured against (gptq-w4-task is a twin's)
    extra["gap_positions"] = gap_positions({**metrics, **summarise(work, refs)[2]})
    earlier = RESULTS / f"{BENCH}.json"  # keep the last measured noise of profiles whose probes are gone
    kept = json.loads(earlier.read_text()).get("profile_noise", {}) if earlier.is_file() else {}
    extra["profile_noise"] = {**kept, **profile_noise()}
    extra["objective_bounds"] = objective_bounds()
    out = write_results(BENCH, COMMAND, rows, extra)
    for f in figures(work, table):
        print(f"figure {f}")
    print(markdown_table(table))
    print(wall_times_markdown(extra["wall_times"]))
    for base, g in extra["gap_positions"].items():
        print(f"{base:24} position between uniform W4 (0) and W3 (1) on seeds {g['seeds']}, measured / "
              "profile-predicted: " + ", ".join(
                  f"{k} {v['measured']:.2f}" + (f" / {v['predicted']:.2f}" if v.get("predicted") is not None else "")
                  for k, v in g.items() if k != "seeds"))
    for part, n in extra["profile_noise"].items():
        print(f"{part} profile ({n['grid']} grid), item noise over {n['splits']} half splits at {n['budget']} bits: "
              f"plans agree on {n['agree']['mean']:.1f} layers; held-out / in-sample positions "
              + ", ".join(f"{o} {n[o + '_held_out']['mean']:.2f} / {n[o + '_in_sample']['mean']:.2f}"
                          for o in ("wikitext2", "gsm8k", "arc_easy")))
    for part, per in extra["objective_bounds"].items():
        for budget, b in per.items():
            print(f"{part} profile, {budget} bits: lowest position per objective "
                  + ", ".join(f"{o} {v:.2f}" for o, v in b["best_alone"].items()) + "; TASA beta 0.5 "
                  + ", ".join(f"{o} {v:.2f}" for o, v in b["tasa_beta_0.5"].items()))
    print(f"written {out}")


def wall_times(work: Path, bases: list[str]) -> dict:
    """Wall seconds of every stage that has run: the shared ones (mixture search, profiles) and, per row
    and seed, quantization (a peer's own process for GPTQModel/AutoRound), scoring and 5-shot generation."""
    stages = {"mixture search (grad-align, 64 x 512 per source)": json.loads(
        (RECORDS / "search.json").read_text())["seconds"]["with_loading"]}
    for label, part in (("layer profile (RTN probes, 90)", "layer"),
                        ("module profile (RTN probes, 3 and 4 bits)", "module"),
                        ("layer profile (GPTQ probes, 90)", "gptq")):
        if (sens := sensitivity(part)) is not None:
            stages[label] = sens["seconds"]["sensitivity"]
    rows = {}
    for base in bases:
        for seed in seeds_of(base):
            name = with_seed(base, seed)
            r = record(name, work)
            if r is not None:
                rows[name] = {"quantize": r.get("seconds"), "score": r.get("eval_seconds"),
                              "generate": r.get("generate_seconds")}
    return {"stages": stages, "rows": rows}


def wall_times_markdown(w: dict) -> str:
    def sec(v):
        return "—" if v is None else f"{v:.0f}"

    lines = ["| stage | wall s |", "| --- | ---: |"] + [f"| {k} | {sec(v)} |" for k, v in w["stages"].items()]
    lines += ["", "| row | quantize s | score s | 5-shot generate s |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {k} | {sec(v['quantize'])} | {sec(v['score'])} | {sec(v['generate'])} |" for k, v in w["rows"].items()]
    return "\n".join(lines)


def markdown_table(table: dict) -> str:
    """The table for docs/RESULTS.md: seed mean (± sd when there are several seeds) per row."""
    def cell(t, k, fmt):
        if k not in t:
            return "—"
        v = t[k]
        return fmt.format(v["mean"]) + (f" ± {fmt.format(v['sd'])}" if v.get("sd") is not None else "")

    lines = ["| row | seeds | bits | WikiText-2 ppl | KL to FP | ARC-E acc / acc_norm | ARC-C acc / acc_norm | "
             "GSM8K gold NLL | GSM8K 5-shot strict | aggregate |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | "
             "---: | ---: | ---: |"]
    for base, t in table.items():
        bits = t["bits"]["mean"] if "bits" in t else parse(base)["bits"]
        lines.append(
            f"| {base} | {t['seeds']} | {'float' if bits is None else f'{bits:.2f}'} | {cell(t, 'wikitext2_ppl', '{:.1f}')} | {cell(t, 'wikitext2_kl', '{:.3f}')} | "
            f"{cell(t, 'arc_easy_acc', '{:.3f}')} / {cell(t, 'arc_easy_acc_norm', '{:.3f}')} | "
            f"{cell(t, 'arc_challenge_acc', '{:.3f}')} / {cell(t, 'arc_challenge_acc_norm', '{:.3f}')} | "
            f"{cell(t, 'gsm8k_gold_nll', '{:.3f}')} | {cell(t, 'gsm8k_strict_match', '{:.3f}')} | "
            f"{cell(t, 'aggregate_task_score', '{:.1f}')} |")
    return "\n".join(lines)


GAP_METRICS = {"wikitext2": "wikitext2_ppl", "gsm8k": "gsm8k_gold_nll", "arc_easy": "arc_easy_acc"}


def position(x: float, w4: float, w3: float, log: bool = False) -> float:
    """Where x lies on the way from the uniform W4 value (0) to the uniform W3 value (1)."""
    if log:
        x, w4, w3 = math.log(x), math.log(w4), math.log(w3)
    return (x - w4) / (w3 - w4)


def profile_noise(budget: float = 3.5, splits: int = 20, seed: int = 0) -> dict:
    """How much item noise costs the TASA plan, in a profile's own additive terms, for every layer profile
    whose probe records are on disk ("layer": RTN probes, "gptq": GPTQ probes), each tagged with its grid.

    For each of ``splits`` random halvings of every objective's probe items: allocate on half A, then place
    that plan between uniform W4 and W3 on half B ("held out"), next to the plan half B would choose for
    itself ("in sample") and the plan of all items; and count the layers on which the plans of the two
    halves agree."""
    out = {}
    for part in ("layer", "gptq"):
        sens = sensitivity(part)
        if sens is not None and (PROFILES[part] / "probes").is_dir():
            out[part] = {"grid": sens["grid"], **_split_halves(sens, PROFILES[part] / "probes", budget, splits, seed)}
    return out


def _split_halves(sens: dict, probes: Path, budget: float, splits: int, seed: int) -> dict:
    import numpy as np
    import torch

    from tasa.allocate.plan import plan_from_sensitivity, predicted_costs
    from tasa.profile.objectives import choice_kl

    recs = {}
    for f in probes.glob("*.json"):
        r = json.loads(f.read_text())
        recs[r["key"]] = r["losses"]
    names = [u["name"] for u in sens["units"]]
    diffs = {}  # objective -> bits -> (items, units) degradations, and the items' token counts
    for obj in sens["costs"]:
        base = recs["base"][obj]
        tokens = np.array(base["tokens"])
        diffs[obj] = {}
        for b in sens["bits"]:
            cols = []
            for n in names:
                probe = recs[f"{n}@{b}"][obj]
                if "choice_logp" in base and sens.get("choice_cost") == "kl":
                    cols.append(choice_kl(torch.tensor(base["choice_logp"], dtype=torch.float64),
                                          torch.tensor(probe["choice_logp"], dtype=torch.float64)).numpy())
                else:
                    cols.append(np.array(probe["nll"]) - np.array(base["nll"]))
            diffs[obj][str(b)] = (np.stack(cols, 1), tokens)
    full = np.array([int(x) for x in plan_from_sensitivity(sens, budget, bits=[3, 4, 8], beta=0.5)[1]["layer_bits"].values()])

    def half(idx: dict) -> dict:
        return {**sens, "costs": {o: {b: {"cost": list(d[i].sum(0) / t[i].sum())} for b, (d, t) in per.items()}
                                  for o, per in diffs.items() for i in [idx[o]]}}

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(splits):
        perms = {o: rng.permutation(len(per["3"][1])) for o, per in diffs.items()}
        a = half({o: p[: len(p) // 2] for o, p in perms.items()})
        b = half({o: p[len(p) // 2:] for o, p in perms.items()})
        plan_a = [int(x) for x in plan_from_sensitivity(a, budget, bits=[3, 4, 8], beta=0.5)[1]["layer_bits"].values()]
        plan_b = [int(x) for x in plan_from_sensitivity(b, budget, bits=[3, 4, 8], beta=0.5)[1]["layer_bits"].values()]
        held, ins, whole = predicted_costs(b, plan_a), predicted_costs(b, plan_b), predicted_costs(b, list(full))
        rows.append({"agree": int(sum(x == y for x, y in zip(plan_a, plan_b))),
                     **{f"{o}_{k}": v[o]["gap_position"] for k, v in (("held_out", held), ("in_sample", ins),
                                                                      ("full_plan", whole)) for o in v}})
    return {"splits": splits, "budget": budget,
            **{k: {"mean": statistics.mean(r[k] for r in rows), "sd": statistics.stdev(r[k] for r in rows)}
               for k in rows[0]}}


def objective_bounds(budgets=(3.25, 3.5, 3.75)) -> dict:
    """The best any plan from each finished profile can do, objective by objective, in the profile's own
    additive terms: per budget, the position between uniform W4 (0) and W3 (1) of the plan allocated on one
    objective alone - the lowest that objective can reach, since any weighting or normalisation of the
    objectives gives a plan at or above it there - next to the positions of TASA's beta-0.5 plan."""
    from tasa.allocate.aggregate import PPL_OBJECTIVE
    from tasa.allocate.plan import plan_from_sensitivity

    out = {}
    for part, bits in {pt: b for pt, b, _ in ALLOCATED_FROM.values()}.items():
        sens = sensitivity(part)
        if sens is None:
            continue
        objs = list(sens["costs"])

        def positions(budget, **kw):
            return {o: v["gap_position"] for o, v in plan_from_sensitivity(sens, budget, bits=bits, **kw)[1][
                "predicted"].items() if "gap_position" in v}

        out[part] = {}
        for budget in budgets:
            alone = {o: positions(budget, beta=1.0) if o == PPL_OBJECTIVE else
                     positions(budget, beta=0.0, task_weights={t: float(t == o) for t in objs if t != PPL_OBJECTIVE})
                     for o in objs}
            out[part][str(budget)] = {"best_alone": {o: alone[o][o] for o in objs}, "alone_plans": alone,
                                      "tasa_beta_0.5": positions(budget, beta=0.5)}
    return out


def gap_positions(metrics: dict) -> dict:
    """Each mixed-precision row's measured position between the uniform GPTQ W4 and W3 rows of its own
    calibration, on the same calibration seeds (means over the seeds the row has; perplexity on a log
    scale), next to what the layer profile predicts if single-layer costs added up (layer-wise plans only).
    ``metrics`` maps each measured (row, seed) name to its metrics, as summarise() returns them."""
    def means(base: str, seeds: list[int]) -> dict | None:
        ms = [metrics.get(with_seed(base, s)) for s in seeds]
        if not seeds or any(m is None for m in ms):
            return None
        return {k: statistics.mean(m[k] for m in ms) for k in GAP_METRICS.values() if all(k in m for m in ms)}

    out = {}
    for base in dict.fromkeys(parse(n)["base"] for n in metrics):
        p = parse(base)
        if p["kind"] not in ("tasa", "tasamod", "tasagptq", "pplonly", "asgptq", "autoround", "artasa") or \
                not 3 < p["bits"] < 4:
            continue
        seeds = [s for s in seeds_of(base) if with_seed(base, s) in metrics]
        gptq = tagged("gptq", p)  # against the uniform rows of the same quantizer
        t, w4, w3 = (means(b, seeds) for b in (base, f"{gptq}-w4-{p['calib']}", f"{gptq}-w3-{p['calib']}"))
        if w4 is None or w3 is None:
            continue
        pred = allocation(base)[1]["predicted"] if p["kind"] in ("tasa", "tasamod", "tasagptq", "pplonly") else {}
        out[base] = {"seeds": seeds, **{
            obj: {"measured": position(t[k], w4[k], w3[k], log=k.endswith("ppl")),
                  "predicted": pred.get(obj, {}).get("gap_position")}
            for obj, k in GAP_METRICS.items() if k in t and k in w4 and k in w3}}
    return out


def figures(work: Path, table: dict) -> list[Path]:
    """docs/figures/paper_*.png: quality against average bits per method, the 3.5-bit layer plans of
    ppl-only and TASA side by side, and the Perplexity Illusion of the profile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tasa.models import load, resolve

    figdir = ROOT / "docs" / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    written = []
    families = {  # line label -> row bases in bit order
        "TASA (searched calibration)": [f"tasa-{b:g}-searched" for b in BUDGETS],
        "ppl-only allocation (WikiText-2)": [f"pplonly-{b:g}-wiki" for b in BUDGETS],
        "tasa GPTQ uniform (WikiText-2)": ["gptq-w3-wiki", "gptq-w4-wiki"],
        "tasa GPTQ uniform (searched)": ["gptq-w3-searched", "gptq-w4-searched"],
        "GPTQModel uniform (WikiText-2)": ["gptqmodel-w3-wiki", "gptqmodel-w4-wiki"],
        "RTN uniform": ["rtn-w3", "rtn-w4"],
        "AutoRound AutoScheme": ["autoround-as3.5-wiki"],
        "AutoScheme choice + tasa GPTQ": ["asgptq-3.5-wiki"],
        "TASA per module (searched)": ["tasamod-3.5-searched"],
        "TASA from GPTQ probes (searched)": ["tasagptq-3.5-searched"],
    }
    metrics = [("aggregate_task_score", "aggregate task score (FP = 100)"), ("gsm8k_gold_nll", "GSM8K gold NLL"),
               ("arc_easy_acc", "ARC-Easy acc"), ("wikitext2_ppl", "WikiText-2 perplexity")]
    curves = families["TASA (searched calibration)"] + families["ppl-only allocation (WikiText-2)"]
    if all(b in table for b in curves):  # drawn once both budget sweeps have landed; other rows as they land
        fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4.2))
        for ax, (key, label) in zip(axes, metrics):
            for name, bases in families.items():
                pts = [(parse(b)["bits"], table[b][key]) for b in bases if b in table and key in table[b]]
                if not pts:
                    continue
                x = [p[0] for p in pts]
                y = [p[1]["mean"] for p in pts]
                err = [p[1]["sd"] or 0.0 for p in pts]
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
            if "fp" in table and key in table["fp"]:
                ax.axhline(table["fp"][key]["mean"], color="black", lw=0.8, ls="--", label="full precision")
            ax.set_xlabel("average weight bits")
            ax.set_title(label)
            if key == "wikitext2_ppl":
                ax.set_yscale("log")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        written.append(figdir / "paper_quality_vs_bits.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    arch = resolve(load("smollm2-135m").model)
    plans = {"ppl-only (beta 1)": layer_bits(plan_for("pplonly-3.5-wiki", arch, work), arch),
             "TASA (beta 0.5)": layer_bits(plan_for("tasa-3.5-searched", arch, work), arch)}
    if sensitivity("gptq") is not None:
        plans["TASA from GPTQ probes"] = layer_bits(plan_for("tasagptq-3.5-searched", arch, work), arch)
    if sensitivity("module") is not None:
        plans["TASA per module (beta 0.5)"] = layer_bits(plan_for("tasamod-3.5-searched", arch, work), arch)
    as_layers = RECORDS / "autoround-as3.5-wiki-scheme.json"
    if as_layers.is_file():
        plans["AutoRound AutoScheme"] = layer_bits(plan_for("asgptq-3.5-wiki", arch, work), arch)
    fig, ax = plt.subplots(figsize=(11, 3.6))
    width = 0.8 / len(plans)
    for k, (name, bits) in enumerate(plans.items()):
        ax.bar([i + (k - (len(plans) - 1) / 2) * width for i in range(len(bits))], bits, width, label=name)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("bits (parameter-weighted)")
    ax.set_title("3.5-bit plans")
    ax.set_xticks(range(arch.num_layers))
    ax.set_ylim(0, max(max(b) for b in plans.values()) + 1.5)
    ax.legend(fontsize=8, ncol=len(plans), loc="upper left")
    fig.tight_layout()
    written.append(figdir / "paper_plans.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    sens = sensitivity("layer")
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    for obj, per_bits in sens["costs"].items():
        c = per_bits["3"]["cost"]
        mean = sum(max(0.0, x) for x in c) / len(c)
        axes[0].plot(range(len(c)), [x / mean for x in c], marker="o", ms=3, label=obj)
    axes[0].set_xlabel("decoder layer (RTN 3-bit, alone)")
    axes[0].set_ylabel("cost / mean cost")
    axes[0].set_title("measured layer sensitivity per objective")
    axes[0].legend(fontsize=8)

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: -v[i])
        r = [0] * len(v)
        for pos, i in enumerate(order):
            r[i] = pos + 1
        return r

    ppl, gsm = ranks(sens["costs"]["wikitext2"]["3"]["cost"]), ranks(sens["costs"]["gsm8k"]["3"]["cost"])
    axes[1].scatter(ppl, gsm)
    for i, (a, b) in enumerate(zip(ppl, gsm)):
        axes[1].annotate(str(i), (a, b), fontsize=7, xytext=(2, 2), textcoords="offset points")
    t = sens["objective_taus"]["3"]["wikitext2|gsm8k"]
    axes[1].set_title(f"layer rank: perplexity vs GSM8K (Kendall tau {t['tau']:.2f} "
                      f"[{t['ci_low']:.2f}, {t['ci_high']:.2f}])")
    axes[1].set_xlabel("rank by perplexity cost (1 = most sensitive)")
    axes[1].set_ylabel("rank by GSM8K cost")
    fig.tight_layout()
    written.append(figdir / "paper_illusion.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


if __name__ == "__main__":
    main()
