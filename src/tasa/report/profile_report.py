"""The Perplexity Illusion report of a sensitivity profile: plots, tau matrix, top-K overlap.

Reads ``sensitivity.json`` (schema ``tasa.sensitivity/1``) and writes, next to it,
``report.md``, ``report.html`` and PNG plots:

- ``sensitivity_<bits>.png``: each objective's cost by unit, with 95 % intervals;
- ``heatmap_<bits>.png``: units x objectives, each objective's costs scaled to [0, 1];
- the Kendall tau matrix between objectives and the top-K overlap table (tables).
"""
from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np

from tasa import schemas
from tasa.artifacts import read_json
from tasa.errors import TasaError
from tasa.report.common import save_figure, write_pages
from tasa.profile.stats import kendall_tau, top_k, top_k_overlap


def tau_matrix(costs: dict, bits: str) -> dict[str, dict[str, float]]:
    names = list(costs)
    return {a: {b: kendall_tau(costs[a][bits]["cost"], costs[b][bits]["cost"]) for b in names} for a in names}


def overlap_table(costs: dict, bits: str, k: int) -> list[tuple[str, str, int]]:
    return [(a, b, top_k_overlap(costs[a][bits]["cost"], costs[b][bits]["cost"], k))
            for a, b in combinations(list(costs), 2)]


def _plots(s: dict, out: Path, bits: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [u["name"] for u in s["units"]]
    x = np.arange(len(names))
    files = []
    fig, axes = plt.subplots(len(s["costs"]), 1, figsize=(max(8, len(names) * 0.3), 2.6 * len(s["costs"])),
                             sharex=True, squeeze=False)
    for ax, (obj, per_bits) in zip(axes[:, 0], s["costs"].items()):
        c = per_bits[bits]
        cost = np.array(c["cost"])
        err = np.array([cost - np.array(c["ci_low"]), np.array(c["ci_high"]) - cost])
        ax.bar(x, cost, yerr=np.nan_to_num(err), capsize=2, color="#4477aa")
        ax.set_ylabel(f"{obj}\nincrease")
        ax.axhline(0, color="black", linewidth=0.5)
    axes[-1, 0].set_xticks(x, [n.replace("layer.", "") for n in names], rotation=90, fontsize=7)
    axes[-1, 0].set_xlabel("unit (layer index)" if s["granularity"] == "layer" else "module")
    fig.suptitle(f"Sensitivity by {s['granularity']}, RTN {bits}-bit, group size {s['group_size']}")
    files.append(save_figure(fig, out / f"sensitivity_{bits}.png"))

    mat = []
    for obj in s["costs"]:
        c = np.array(s["costs"][obj][bits]["cost"])
        span = c.max() - c.min()
        mat.append((c - c.min()) / span if span > 0 else np.zeros_like(c))
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.3), 0.6 * len(mat) + 1.5))
    im = ax.imshow(np.array(mat), aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(mat)), list(s["costs"]))
    ax.set_xticks(x, [n.replace("layer.", "") for n in names], rotation=90, fontsize=7)
    fig.colorbar(im, ax=ax, label="cost scaled to [0, 1] per objective")
    ax.set_title(f"Which units each objective finds sensitive ({bits}-bit)")
    files.append(save_figure(fig, out / f"heatmap_{bits}.png"))
    return files


def write_report(sensitivity_json: str | Path, k: int = 8) -> Path:
    """Write report.md, report.html and the plots next to ``sensitivity_json``; returns the Markdown path."""
    path = Path(sensitivity_json)
    if not path.is_file():
        raise TasaError(f"sensitivity file not found: {path}")
    s = read_json(path)
    schemas.check(s, schemas.SENSITIVITY, str(path))
    out = path.parent
    n_units = len(s["units"])
    k = min(k, n_units)
    md = [f"# Sensitivity profile: {s['model']}", "",
          f"{s['granularity']} granularity, {n_units} units, RTN bits {', '.join(map(str, s['bits']))}, "
          f"group size {s['group_size']}; {s.get('method', 'measured')} sensitivities; "
          f"{s['seconds']['total']:.0f} s.", "",
          "| objective | kind | items | scored tokens | full-precision value |", "| --- | --- | ---: | ---: | ---: |"]
    for name, o in s["objectives"].items():
        base = "–" if o["base"] is None else f"{o['base']:.4f}"
        md.append(f"| {name} | {o['kind']} | {o['items']} | {o['scored_tokens']} | {base} |")
    md.append("")
    if s.get("estimators"):
        md += ["Fast estimators against the measured probes (Kendall tau of unit rankings; cost relative to "
               "the probes):", "", "| estimator | objective | bits | tau | cost ratio |",
               "| --- | --- | ---: | ---: | ---: |"]
        for est, e in s["estimators"].items():
            for obj, per_bits in e["tau_vs_measured"].items():
                for b, tau in per_bits.items():
                    md.append(f"| {est} | {obj} | {b} | {tau:.2f} | {e['cost_ratio']:.3f} |")
        md.append("")
    for bits in map(str, s["bits"]):
        names = list(s["costs"])
        md += [f"## {bits}-bit", ""]
        if len(names) > 1:
            tm = tau_matrix(s["costs"], bits)
            md += ["Kendall tau between objectives' unit rankings:", "",
                   "| | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
            md += [f"| {a} | " + " | ".join(f"{tm[a][b]:.2f}" for b in names) + " |" for a in names]
            if s.get("objective_taus", {}).get(bits):
                md += ["", "With 95 % bootstrap intervals (items resampled within each objective):", ""]
                md += [f"- tau({pair.replace('|', ', ')}) = {t['tau']:.2f} [{t['ci_low']:.2f}, {t['ci_high']:.2f}]"
                       for pair, t in s["objective_taus"][bits].items()]
            md += ["", f"Top-{k} overlap (units among the {k} most sensitive of both):", "",
                   "| objective A | objective B | shared |", "| --- | --- | ---: |"]
            md += [f"| {a} | {b} | {n} of {k} |" for a, b, n in overlap_table(s["costs"], bits, k)]
            md.append("")
        md += [f"Top-{k} units per objective (most sensitive first), split-half rank stability:", ""]
        for obj in names:
            top = [s["units"][i]["name"].replace("layer.", "") for i in top_k(s["costs"][obj][bits]["cost"], k)]
            md.append(f"- {obj}: {', '.join(top)} (stability {s['stability'][obj][bits]:.2f})")
        md.append("")
        for f in _plots(s, out, bits):
            md += [f"![{f}]({f})", ""]
    if s.get("warnings"):
        md += ["## Warnings", ""] + [f"- {w}" for w in s["warnings"]] + [""]
    text = "\n".join(md)
    write_pages(out, text, f"Sensitivity profile: {s['model']}")
    return out / "report.md"
