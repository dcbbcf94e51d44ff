"""Report of a calibration-mixture search: criterion curves, per-layer curves, damping study.

Reads ``mixture.json`` (schema ``tasa.mixture/1``) and writes, next to it, ``report.md``,
``report.html`` and PNG plots:

- ``criteria.png``: every criterion against the general-text share, each with its best point
  marked;
- ``hessian_layers.png``: the Hessian-trace curve of every decoder layer, each divided by its
  minimum;
- ``damping.png``: the combined Hessian-trace curve for several dampings.

On a simplex grid (several task sources weighted freely) the report has the table only.
"""
from __future__ import annotations

from pathlib import Path

from tasa import schemas
from tasa.artifacts import read_json
from tasa.report.common import save_figure, write_pages


def _fmt(w) -> str:
    return "(" + ", ".join(f"{x:g}" for x in w) + ")"


def _plots(s: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = [w[0] for w in s["grid"]]
    files = []
    res = s["results"]
    fig, axes = plt.subplots(1, len(res), figsize=(4.2 * len(res), 3.4), squeeze=False)
    for ax, (crit, r) in zip(axes[0], res.items()):
        ax.plot(alphas, r["values"], marker="o")
        if "fine" in r:
            ax.plot(r["fine"]["alpha"], r["fine"]["values"], color="#999999", linewidth=0.8, zorder=0)
        ax.axvline(r["best"][0], color="#cc3311", linestyle="--", linewidth=1)
        ax.set_xlabel(f"general share ({s['general']})")
        ax.set_title(f"{crit} ({'lower' if r['lower_is_better'] else 'higher'} is better)", fontsize=9)
        if crit == "hessian-trace":
            ax.set_yscale("log")
    files.append(save_figure(fig, out / "criteria.png"))
    ht = res.get("hessian-trace")
    if ht is not None:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for i, lv in enumerate(ht["per_layer"]):
            m = min(lv)
            ax.plot(alphas, [v / m for v in lv], color=plt.cm.viridis(i / max(1, len(ht["per_layer"]) - 1)),
                    linewidth=0.9)
        ax.set_yscale("log")
        ax.set_xlabel(f"general share ({s['general']})")
        ax.set_ylabel("f(alpha) / min f (per layer)")
        ax.set_title("Hessian trace by decoder layer (dark: first layer)", fontsize=9)
        files.append(save_figure(fig, out / "hessian_layers.png"))
    if ht is not None and "damping" in ht:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for d, vals in ht["damping"].items():
            ax.plot(alphas, vals, marker=".", label=f"damp {d}")
        ax.set_yscale("log")
        ax.set_xlabel(f"general share ({s['general']})")
        ax.set_ylabel("tr(H_test H_alpha^-1) / d")
        ax.legend(fontsize=8)
        files.append(save_figure(fig, out / "damping.png"))
    return files


def write_report(path: str | Path) -> Path:
    path = Path(path)
    s = schemas.Mixture.from_dict(read_json(path), str(path)).to_dict()  # checked: schema, fields, lengths
    out = path.parent
    two = not s["simplex"]
    lines = [f"# Calibration-mixture search: {s['general']} + {', '.join(s['tasks'])}", "",
             f"Held-out target rows: {', '.join(s['targets'])} ({s['heldout_samples']} windows; "
             f"{s['heldout_fraction']:g} of each target's calibration rows held out by content hash, "
             f"seed {s['seed']}). Calibration token sets: {s['nsamples']} x {s['seqlen']} tokens per source.", "",
             f"**Chosen by {s['criteria'][0]}: {s['calib']}**", "",
             "| weights (" + ", ".join(s["sources"]) + ") | " + " | ".join(s["results"]) + " |",
             "|---|" + "---|" * len(s["results"])]
    for j, w in enumerate(s["grid"]):
        cells = []
        for crit, r in s["results"].items():
            mark = " *" if list(w) == r["best"] else ""
            cells.append(f"{r['values'][j]:.5g}{mark}")
        lines.append(f"| {_fmt(w)} | " + " | ".join(cells) + " |")
    lines += ["", "\\* best by that criterion.", ""]
    ht = s["results"].get("hessian-trace")
    if ht is not None and two:
        study = ("; damping study at alpha = 0: " + ", ".join(f"damp {d}: {v[-1]:.4g}"
                                                             for d, v in ht["damping"].items())
                 if "damping" in ht else "")
        lines += [f"Hessian trace on a fine grid: convex {'yes' if ht['convex'] else 'NO'}; "
                  f"f(alpha = 0) / min f = {ht['blowup_ratio']:.3g} (the task-only side's blow-up){study}", ""]
    lines += ["Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in s["seconds"].items()), ""]
    if two:
        lines += [f"![{f}]({f})" for f in _plots(s, out)]
    write_pages(out, "\n".join(lines) + "\n", "tasa mixture search")
    return out / "report.md"
