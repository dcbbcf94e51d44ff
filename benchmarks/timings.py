"""Timings that unit tests used to assert (timings are not tests): the exact bit allocation at a 70B model's
size, and loading the embedded SmolLM2-135M from tasa's float cache (no GGUF dequantization).

    .venv/bin/python benchmarks/timings.py

Writes benchmarks/results/timings.json.  Each figure is the median of 5 runs on an otherwise idle machine.
"""
from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

# benchmarks/ must not be on sys.path: benchmarks/profile.py would shadow the standard 'profile' module
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or '.').resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
from benchmarks.common import row, write_results  # noqa: E402

from tasa.allocate.dp import allocate  # noqa: E402
from tasa.models import load  # noqa: E402


def median_seconds(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    rng = random.Random(0)
    costs = [{b: rng.random() / b for b in (2, 3, 4, 8)} for _ in range(80)]
    sizes = [218_103_808] * 80  # Llama-70B-like: 80 decoder layers of ~218M weights each
    dp = median_seconds(lambda: allocate(costs, sizes, 3.5))
    load("smollm2-135m")  # the first load fills the float cache
    cached = median_seconds(lambda: load("smollm2-135m"))
    rows = [row("dp-80-layers-4-candidates", "tasa", "exact DP", 3.5, None, None, {"layers": 80, "candidates": 4},
                dp),
            row("load-smollm2-cached", "tasa", "load", None, None, None, {"parameters": 134_515_008}, cached)]
    out = write_results("timings", ".venv/bin/python benchmarks/timings.py", rows)
    print(f"DP, 80 layers x 4 candidates: {dp:.3f} s; SmolLM2-135M from the float cache: {cached:.2f} s -> {out}")


if __name__ == "__main__":
    main()
