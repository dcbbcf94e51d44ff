"""The report of a ``tasa run``: the plan, the sensitivities behind it, the evaluation against full
precision, sizes and timings (report.md, report.html, plan.png in the run directory)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tasa import schemas
from tasa.artifacts import read_json
from tasa.config import BETTER_QUANTIZER, BETTER_QUANTIZER_BF16, GENERAL_TEXT, CalibSpec
from tasa.mixture.search import calib_string
from tasa.report.common import save_figure, write_pages

# metrics shown per task, lower-is-better marked with a trailing "-"
_SHOWN = {"wikitext2": [("ppl", "perplexity", "-"), ("kl", "KL to full precision", "-")],
          "_mc": [("acc", "acc", "+"), ("acc_norm", "acc_norm", "+"), ("gold_logprob", "gold log-prob", "+"),
                  ("flip_rate", "flips vs full precision", "-")],
          "_gen": [("strict_match", "strict match", "+"), ("gold_nll", "gold-solution NLL", "-"),
                   ("flip_rate", "flips vs full precision", "-")]}


def _plan_figure(plan: dict, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(plan["modules"])
    layer_of = {}
    for n in names:
        head, _, local = n.partition(".layers.")
        idx, _, local = local.partition(".")
        layer_of[n] = (int(idx), local)
    layers = sorted({i for i, _ in layer_of.values()})
    locals_ = list(dict.fromkeys(loc for _, loc in layer_of.values()))
    grid = np.full((len(locals_), len(layers)), np.nan)
    for n, spec in plan["modules"].items():
        i, loc = layer_of[n]
        grid[locals_.index(loc), layers.index(i)] = spec["bits"]
    fig, ax = plt.subplots(figsize=(max(8, len(layers) * 0.32), 0.45 * len(locals_) + 1.6))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=2, vmax=8)
    for (r, c), v in np.ndenumerate(grid):
        if not np.isnan(v):
            ax.text(c, r, f"{int(v)}", ha="center", va="center", fontsize=7, color="white" if v < 6 else "black")
    ax.set_xticks(range(len(layers)), layers, fontsize=7)
    ax.set_yticks(range(len(locals_)), locals_, fontsize=8)
    ax.set_xlabel("decoder layer")
    fig.colorbar(im, ax=ax, label="bits")
    ax.set_title("Bits per module")
    return save_figure(fig, out / "plan.png")


def _rows(task: str, fp: dict, q: dict) -> list[str]:
    kind = "wikitext2" if task == "wikitext2" else ("_mc" if "acc" in q else "_gen")
    rows = []
    for key, label, better in _SHOWN[kind]:
        if key not in q:
            continue
        a = fp.get(key)
        delta = "" if a is None else f"{q[key] - a:+.4f}"
        rows.append(f"| {task} | {label} ({'lower' if better == '-' else 'higher'} is better) | "
                    f"{'' if a is None else f'{a:.4f}'} | {q[key]:.4f} | {delta} |")
    return rows


def _unit(alloc: dict) -> str:
    """What the plan's profile probed one at a time: "module" or "layer"."""
    return "module" if alloc.get("granularity") == "module" else "layer"


def _prediction(alloc: dict) -> list[str]:
    """The profile's additive prediction of where the plan lands between the uniform widths around it."""
    pos = {o: p for o, p in alloc.get("predicted", {}).items() if "gap_position" in p}
    if not pos:
        return []
    lo, hi = next(iter(pos.values()))["between"]
    return [f"If single-{_unit(alloc)} costs added up, this plan would sit at this fraction of the way from uniform "
            f"{hi}-bit (0) to uniform {lo}-bit (1): " + ", ".join(f"{o} {p['gap_position']:.2f}" for o, p in pos.items())
            + ".", ""]


def _quantizer(summary: dict) -> list[str]:
    """Which quantizer made the checkpoint, in how long (and why, when chosen under a time budget), and the better
    one where time allows (or on a GPU; on a CPU that computes bfloat16 natively also the faster one at AutoRound's
    quality), with the `tasa quantize` command that requantizes the run's plan by it; with learned rounding (used
    or named) on a calibration without the run's general text, the mixed one to use."""
    name, seconds = summary.get("quantizer", "gptq"), summary["seconds"].get("quantize")
    took = f" in {seconds:.0f} s" if seconds is not None else ""
    dtype = summary.get("quantize_dtype", summary.get("dtype"))
    computed = f", the model in {dtype} while quantized," if dtype not in (None, "float32") else ""
    md = ["", "## Quantizer", "", f"The checkpoint was made by {name}{computed}{took}."]
    choice = summary.get("quantizer_choice")
    if choice:
        md.append(f"It was chosen under the run's time budget of {summary['time_budget']:g} minutes (`--time-budget`; "
                  f"the quantize time includes the trials): {choice['describe']}.")
    learned = name.startswith("learned rounding")
    calib = summary["calib"]
    general = dict(CalibSpec.parse(calib).sources).get(GENERAL_TEXT, 0.0)
    if general <= 0 and summary.get("tasks"):
        tasks = summary["tasks"]
        calib = calib_string([GENERAL_TEXT, *tasks], (0.75, *[0.25 / len(tasks)] * len(tasks)))
        md.append(f"{'This' if learned else 'With learned rounding, this'} calibration has no general text "
                  f"({GENERAL_TEXT}). Learned rounding protects what its calibration shows it: on SmolLM2-135M "
                  "three quarters general text halved the KL to full precision at no measurable task cost "
                  f"(docs/RESULTS.md, \"The better quantizer on task-only calibration\"), so run it with "
                  f"`--calib {calib}`.")
    if learned:
        return md

    def estimate(ratio: float) -> str:
        return f", about {ratio * seconds:.0f} s for this run" if seconds is not None else ""

    flags, ratio = BETTER_QUANTIZER
    if str(summary.get("device", "cpu")).startswith("cuda"):
        md.append(f"On a GPU, `{flags}` (learned rounding) leaves less error: its steps are a layer's forward and "
                  "backward passes, what a GPU does best (docs/RESULTS.md, \"Quantizer options\").")
    else:
        md.append(f"Where time allows, and on a GPU, `{flags}` (learned rounding) leaves less error: about "
                  f"{ratio:g}x this quantizer's time on a CPU{estimate(ratio)} (docs/RESULTS.md, \"Quantizer "
                  "options\").")
        if summary.get("bfloat16_native") and summary.get("dtype") in (None, "float32"):
            flags, fast_ratio = BETTER_QUANTIZER_BF16
            md.append(f"This CPU computes bfloat16 natively: `{flags}` learns with the model in bfloat16, as "
                      f"AutoRound does here, and reaches AutoRound's quality in about {fast_ratio:g}x this "
                      f"quantizer's time{estimate(fast_ratio)} (docs/RESULTS.md, \"The time goal as the issue states "
                      "it\"); give it to `tasa quantize` as below (`tasa run --dtype bfloat16` would also search, "
                      "profile and evaluate in bfloat16).")
    if all(k in summary for k in ("output_dir", "nsamples", "seqlen", "seed")):
        out, device = summary["output_dir"], str(summary.get("device", "cpu"))
        on = f" --device {device}" if device != "cpu" else ""
        md.append(f"To requantize this run's plan by it, the other stages as they are (with the run's `--format` "
                  f"and `--target`, if it set them): `tasa quantize --model {summary['model']}{on} --plan "
                  f"{out}/plan.json --calib {calib} --nsamples {summary['nsamples']} --seqlen {summary['seqlen']} "
                  f"--seed {summary['seed']} {flags} --output-dir {out}/model-learned`.")
    return md


def write_run_report(run_dir: Path, summary: dict) -> Path:
    """Write report.md / report.html / plan.png into ``run_dir`` from the run's artifacts and ``summary``."""
    plan = read_json(run_dir / "plan.json")
    alloc = plan["meta"]["allocation"]
    fp = schemas.Evaluation.from_dict(read_json(run_dir / "eval-fp.json"), "eval-fp.json").results
    q = schemas.Evaluation.from_dict(read_json(run_dir / "eval-quant.json"), "eval-quant.json").results
    md = [f"# tasa run: {summary['model']}", "",
          f"Budget {alloc['budget']:g} bits per weight{' (scale/zero storage included)' if alloc['budget_includes_metadata'] else ''}"
          f", candidates {', '.join(map(str, alloc['candidates']))}, beta {alloc['beta']}, target {alloc['target']}, "
          f"calibration {summary['calib']}, quantizer {summary.get('quantizer', 'gptq')}.", "",
          f"Average weight bits {alloc['average_weight_bits']:.4f}; with scale/zero storage "
          f"{alloc['effective_bits_with_metadata']:.4f}.", "", *_prediction(alloc),
          "## Plan", "", f"![plan.png]({_plan_figure(plan, run_dir)})", "",
          "| layer | bits (average of its modules) |", "| --- | ---: |"]
    md += [f"| {name.replace('layer.', '')} | {b:g} |" for name, b in alloc["layer_bits"].items()]
    md += _quantizer(summary)
    if (run_dir / "mixture" / "mixture.json").is_file():
        mix = read_json(run_dir / "mixture" / "mixture.json")
        md += ["", "## Calibration mixture", "",
               f"Chosen by {mix['criteria'][0]}: {mix['calib']} (details in [mixture/report.md](mixture/report.md)).",
               "", "![criteria.png](mixture/criteria.png)"]
    md += ["", "## Evaluation against full precision", "",
           f"Held-out test rows: the first {summary['eval_limit']} of each task, zero-shot; wikitext2: the "
           f"first {summary['eval_windows']} windows of {summary['seqlen']} tokens.", "",
           "| task | metric | full precision | quantized | change |", "| --- | --- | ---: | ---: | ---: |"]
    for task in q:
        md += _rows(task, fp.get(task, {}), q[task])
    md += ["", "## Sensitivities", "",
           f"Measured {_unit(alloc)} sensitivities ({summary['probe_tokens']} scored tokens per objective; "
           "Kendall tau between objectives and top-K overlaps in [profile/report.md](profile/report.md)):", ""]
    md += [f"![{p.name}](profile/{p.name})" for p in sorted((run_dir / "profile").glob("sensitivity_*.png"))]
    md.append("")
    if summary.get("warnings"):
        md += [f"- {w}" for w in summary["warnings"]] + [""]
    sizes = summary["sizes"]
    md += ["## Sizes", "", "| what | MiB |", "| --- | ---: |",
           f"| quantized linears at fp16 | {sizes['linears_fp16_bytes'] / 2**20:.1f} |",
           f"| quantized linears packed (codes + scales + zeros + g_idx) | {sizes['linears_packed_bytes'] / 2**20:.1f} |",
           f"| whole checkpoint on disk | {sizes['checkpoint_bytes'] / 2**20:.1f} |", "",
           "## Timings", "", "| stage | seconds | this invocation |", "| --- | ---: | --- |"]
    md += [f"| {k} | {v:.0f} | {'ran' if k in summary['ran'] else 'cached'} |" for k, v in summary["seconds"].items()]
    md.append("")
    text = "\n".join(md)
    write_pages(run_dir, text, f"tasa run: {summary['model']}")
    return run_dir / "report.md"
