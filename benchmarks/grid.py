"""Symmetric RTN grids on SmolLM2-135M: why tasa uses the signed-max scale (2026-11-25).

    .venv/bin/python benchmarks/grid.py      # about 15 minutes here; rows cached in benchmarks/.work/grid

Every decoder linear (210) RTN-quantized at 3 and 4 bits, group size 64, zero point 2^(bits-1), under
each way of choosing a group's scale; WikiText-2 perplexity on the first 40 test windows of 512 tokens
(the paper table's setting) and the squared weight error summed over all linears. Grids:

- ``reference-fp32``: the GPTQ reference grid, scale = 2 max|x| / (2^bits - 1) in float32 (tasa before
  2026-11-24); every group's extreme sits on a rounding tie, broken to even.
- ``reference-fp16``: the same, the scale rounded to fp16 as checkpoints store it (tasa 2026-11-24..25).
- ``reference-jitter``: the float32 reference scale times (1 + 1e-4 N(0, 1)), seed 0: how much the ties
  alone move perplexity.
- ``reference-fp16-down``: the reference scale rounded to the fp16 value toward zero.
- ``fit``: a positive scale that fits both ends, max(x+ / (z - 1), x- / z), fp16.
- ``signed-max``: tasa's grid (``tasa.quant.rtn.compute_grid``): the largest-magnitude weight m exactly on
  code 0, scale -m / z, fp16.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or '.').resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
from benchmarks.common import WORK, cached, row, write_results  # noqa: E402

BENCH = "grid"
COMMAND = ".venv/bin/python benchmarks/grid.py"
GROUP, SEQLEN, WINDOWS = 64, 512, 40
GRIDS = ("reference-fp32", "reference-fp16", "reference-jitter", "reference-fp16-down", "fit", "signed-max")
BITS = (4, 3)


def scale_of(grid: str, x, bits: int, gen):
    """(rows, 1) scale of each row of ``x`` (rows, GROUP) under ``grid``; the zero point is 2^(bits-1)."""
    import torch

    from tasa.quant.rtn import FP16_MIN_SCALE, compute_grid

    z = 2.0 ** (bits - 1)
    if grid == "signed-max":
        return compute_grid(x, bits, sym=True)[0][:, None]
    if grid == "fit":
        pos, neg = x.amax(1, keepdim=True).clamp_min(0), (-x.amin(1, keepdim=True)).clamp_min(0)
        return torch.maximum(pos / (z - 1), neg / z).clamp_min(FP16_MIN_SCALE).half().float()
    s = 2 * x.abs().amax(1, keepdim=True).clamp_min(FP16_MIN_SCALE) / (2**bits - 1)
    if grid == "reference-fp16":
        return s.half().float()
    if grid == "reference-fp16-down":
        h = s.half()
        return torch.where(h.float() > s, torch.nextafter(h, torch.zeros_like(h)), h).float()
    if grid == "reference-jitter":
        return s * (1 + 1e-4 * torch.randn(s.shape, generator=gen))
    return s


def measure(grid: str, bits: int) -> dict:
    import torch

    from tasa.data import eval_texts
    from tasa.eval.perplexity import perplexity
    from tasa.models import load, resolve
    from tasa.quant.rtn import dequantize, quantize_codes

    lm = load("smollm2-135m")
    arch = resolve(lm.model)
    gen = torch.Generator().manual_seed(0)
    sse, t0 = 0.0, time.perf_counter()
    mods = dict(lm.model.named_modules())
    with torch.no_grad():
        for m in arch.modules:
            w = mods[m.name].weight
            x = w.float().reshape(-1, GROUP)
            s = scale_of(grid, x, bits, gen)
            z = torch.full_like(s, 2.0 ** (bits - 1))
            q = dequantize(quantize_codes(x, s, z, bits), s, z)
            sse += float((q - x).pow(2).sum())
            w.copy_(q.reshape(w.shape))
    seconds = time.perf_counter() - t0
    ppl = perplexity(lm.model, lm.tokenizer, "\n\n".join(eval_texts("wikitext2")), seqlen=SEQLEN, limit=WINDOWS,
                     progress=False).ppl
    return {"metrics": {"wikitext2_ppl": ppl, "weight_sse": sse}, "seconds": seconds}


def main() -> None:
    rows = []
    for bits in BITS:
        for grid in GRIDS:
            name = f"rtn-w{bits}-{grid}"
            r = cached(WORK / BENCH / f"{name}.json", lambda: measure(grid, bits))
            print(f"{name:28} ppl {r['metrics']['wikitext2_ppl']:8.2f}  sse {r['metrics']['weight_sse']:10.0f}",
                  flush=True)
            rows.append(row(name, "tasa", f"rtn ({grid} grid)", bits, GROUP, None, r["metrics"], r["seconds"]))
    print("written", write_results(BENCH, COMMAND, rows, {"settings": {"eval_windows": WINDOWS, "seqlen": SEQLEN}}))


if __name__ == "__main__":
    main()
