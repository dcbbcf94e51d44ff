"""Regression fixture: tiny fixed `tasa run`s whose artifacts are pinned by hash.

Recorded before the pipeline was reshaped (issue 35) and compared after every change since: the mixture
chosen (its scores), the profile's costs, the plan and the packed checkpoint tensors must stay bit for bit
what they were.  Two runs cover the three layer walks the pipeline makes: a mixture search (Hessians and
gradients, ``--calib auto``) with RTN probes, and GPTQ probes (calibration Hessians per layer) on a fixed
calibration; both quantize with GPTQ and export.

One CPU thread (the GPTQ result depends on the thread count: README "Reproducibility") and portable kernels
(:data:`PORTABLE_NUMERICS`), in a fresh process.  An intentional
change of results re-records the hashes, and says why under "changes" in the fixture, with::

    .venv/bin/python -m tests.unit.test_regression_run --record
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "regression_run.json"

RUNS = {
    "auto-rtn": ["--calib", "auto", "--tasks", "gsm8k", "--search-samples", "4"],
    "fixed-gptq": ["--calib", "wikitext2:0.5,gsm8k:0.5", "--tasks", "gsm8k", "--probe-quantizer", "gptq"],
}


def _args(model_dir: Path, out_dir: Path, extra: list[str]) -> list[str]:
    return ["run", "--model", str(model_dir), "--budget", "3", "--bits", "2,4", "--group-size", "16",
            "--probe-tokens", "40", "--nsamples", "4", "--seqlen", "32", "--eval-limit", "2", "--eval-windows", "1",
            "--output-dir", str(out_dir), "--quiet", *extra]


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def digests(out_dir: Path) -> dict:
    """Hashes of what a run decided and wrote: mixture, profile costs, plan, packed tensors, evaluation."""
    from safetensors.torch import load_file

    out = {}
    if (out_dir / "mixture" / "mixture.json").is_file():
        m = json.loads((out_dir / "mixture" / "mixture.json").read_text())
        out["mixture"] = _sha({k: m[k] for k in ("calib", "results")})
    sens = json.loads((out_dir / "profile" / "sensitivity.json").read_text())
    out["profile_costs"] = _sha(sens["costs"])
    out["plan"] = _sha(json.loads((out_dir / "plan.json").read_text())["modules"])
    tensors = {}
    for f in sorted((out_dir / "model").glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    out["checkpoint_tensors"] = h.hexdigest()
    quant = json.loads((out_dir / "eval-quant.json").read_text())["results"]
    out["eval_quant"] = _sha({task: {k: v for k, v in m.items() if k != "seconds"} for task, m in quant.items()})
    return out


def measure(name: str, root: Path) -> dict:
    from tasa.cli import run

    from tests.conftest import byte_tokenizer, tiny_llama

    model_dir = root / "model"
    if not model_dir.is_dir():
        tiny_llama().save_pretrained(model_dir)
        byte_tokenizer().save_pretrained(model_dir)
    out_dir = root / name
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = run(_args(model_dir, out_dir, RUNS[name]))
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return digests(out_dir)


# Float results depend on the CPU: MKL picks its kernels by processor (an AMD EPYC and an Intel Xeon sum a matmul
# differently) and ATen by instruction set.  The runs are made in a fresh process with both pinned - MKL's
# conditional numerical reproducibility mode and ATen's portable kernels - so the hashes hold on any x86-64 CPU.
PORTABLE_NUMERICS = {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1",
                     "MKL_NUM_THREADS": "1"}


def measure_portably(name: str, root: Path) -> dict:
    """:func:`measure` in a fresh process with :data:`PORTABLE_NUMERICS` (set before torch loads MKL)."""
    import os
    import subprocess

    env = {**os.environ, **PORTABLE_NUMERICS}
    out = subprocess.run([sys.executable, "-m", "tests.unit.test_regression_run", "--measure", name, str(root)],
                         cwd=FIXTURE.parents[2], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(RUNS))
def test_run_artifacts_match_the_recorded_hashes(name, tmp_path, data_dir):
    recorded = json.loads(FIXTURE.read_text())["runs"][name]
    assert measure_portably(name, tmp_path) == recorded


if __name__ == "__main__":  # --record: write the fixture from this checkout's results; --measure NAME ROOT: one run
    import os
    import tempfile

    from tests.conftest import write_tiny_data

    if sys.argv[1:2] == ["--measure"] and len(sys.argv) == 4:
        root = Path(sys.argv[3])
        if "TASA_DATA_DIR" not in os.environ:
            data = root / "data"
            os.environ["TASA_DATA_DIR"] = str(data if data.is_dir() else write_tiny_data(data))
        print(json.dumps(measure(sys.argv[2], root)))
        sys.stdout.flush()
        os._exit(0)
    if sys.argv[1:] != ["--record"]:
        raise SystemExit(__doc__)

    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: measure_portably(name, Path(tmp)) for name in sorted(RUNS)}
    changes = json.loads(FIXTURE.read_text()).get("changes", []) if FIXTURE.is_file() else []
    FIXTURE.write_text(json.dumps({"note": "recorded by python -m tests.unit.test_regression_run --record",
                                   "torch": torch.__version__, "runs": runs, "changes": changes}, indent=2) + "\n")
    print(f"written {FIXTURE}", file=sys.stderr)
    os._exit(0)
