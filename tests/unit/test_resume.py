"""Resume proven end to end: `tasa run` (tiny random model) is killed inside each stage in turn -- a hard exit
(os._exit, as SIGKILL: no finally blocks, no atexit) at a point within the stage's work -- then run again to the
end; every artifact must equal an uninterrupted run's byte for byte, except the fields that record when and how
long (dates, seconds, machine), which are removed before comparing JSON, and the report, which prints them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import byte_tokenizer, tiny_llama

ROOT = Path(__file__).resolve().parents[2]

# stage -> (function whose n-th call exits the process, n): a point inside the stage's own work
KILL_POINTS = {
    "mixture": ("tasa.mixture.collect.count_sketch", 3),
    "profile": ("tasa.profile.probe.ProbeStore.put", 3),
    "allocate": ("tasa.plan.Plan.save", 1),
    "quantize": ("tasa.quant.gptq._gptq_batch", 9),  # each batch here a linear (tiny dense model)
    "quantize-writing": ("tasa.pipeline.quantize.usual_modes", 1),  # the checkpoint half written
    "eval_fp": ("tasa.eval.runner.run_task", 1),
    "eval_quant": ("tasa.eval.runner.run_task", 2),
    "report": ("tasa.report.run_report.write_run_report", 1),
}
VOLATILE = {"date", "seconds", "machine", "ran"}  # when, how long, where; run.json's stages run by this process

DRIVER = """
import importlib, os, sys
target, n, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
module_name, _, attr = target.rpartition(".")
try:
    owner = importlib.import_module(module_name)
except ModuleNotFoundError:  # a method: module.Class.method
    module_name, _, cls = module_name.rpartition(".")
    owner = getattr(importlib.import_module(module_name), cls)
real, calls = getattr(owner, attr), [0]
def killer(*a, **k):
    calls[0] += 1
    if calls[0] == n:
        os._exit(137)
    return real(*a, **k)
setattr(owner, attr, killer)
from tasa.cli import main
main(args)
"""


def run_args(model_dir: Path, out_dir: Path) -> list[str]:
    return ["run", "--model", str(model_dir), "--tasks", "gsm8k", "--calib", "auto", "--budget", "3", "--bits", "2,4",
            "--group-size", "16", "--probe-tokens", "40", "--nsamples", "4", "--seqlen", "32", "--eval-limit", "2",
            "--eval-windows", "1", "--output-dir", str(out_dir), "--quiet"]


def tasa(args: list[str], kill: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = ([sys.executable, "-c", DRIVER, kill[0], str(kill[1]), *args] if kill
           else [sys.executable, "-m", "tasa", *args])
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def artifacts(out_dir: Path) -> dict[str, object]:
    """Every file of a run directory: JSON without its volatile fields, other files as bytes."""
    found = {}
    for f in sorted(out_dir.rglob("*")):
        if f.is_dir():
            continue
        rel = str(f.relative_to(out_dir))
        if f.suffix == ".json":
            found[rel] = _strip(json.loads(f.read_text().replace(str(out_dir), "<OUT>")))
        elif f.name in ("report.md", "report.html"):
            found[rel] = "present"  # prints the recorded times
        else:
            found[rel] = f.read_bytes()
    return found


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    from tests.conftest import write_tiny_data

    os.environ["TASA_DATA_DIR"] = str(write_tiny_data(root / "data"))
    model_dir = root / "model"
    tiny_llama().save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    done = tasa(run_args(model_dir, root / "uninterrupted"))
    assert done.returncode == 0, done.stderr
    yield root, artifacts(root / "uninterrupted")
    del os.environ["TASA_DATA_DIR"]


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_run_killed_inside_a_stage_resumes_to_the_same_artifacts(reference, point):
    root, expected = reference
    out = root / f"killed-in-{point}"
    stage = point.split("-")[0]
    killed = tasa(run_args(root / "model", out), kill=KILL_POINTS[point])
    assert killed.returncode == 137, killed.stderr[-2000:]
    stages = json.loads((out / "stages.json").read_text())["stages"]
    if stage == "report":  # after the last stage
        assert all(rec["done"] for rec in stages.values()) and not (out / "report.md").exists()
    else:
        assert stages[stage]["done"] is False  # the kill landed inside this stage
        assert all(rec["done"] for name, rec in stages.items() if name != stage)
    resumed = tasa(run_args(root / "model", out))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ran = resumed.stdout.split("stages run: ")[1].split(";")[0]
    assert ran.split(", ")[0] == ("none (all stages up to date)" if stage == "report" else stage)  # none redone
    got = artifacts(out)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name] == expected[name], name


def test_stale_temporary_directories_of_killed_writers_are_removed(tmp_path):
    from tasa.pipeline.common import clear_stale_temps, temp_dir_for

    out = tmp_path / "model"
    mine = temp_dir_for(out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".model.tmp-{int(dead.stdout)}-abc"
    live = tmp_path / f".model.tmp-{os.getppid()}-xyz"  # another writer, still running
    other = tmp_path / ".other.tmp-1-abc"
    for d in (stale, live, other):
        d.mkdir()
    clear_stale_temps(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])
    assert not mine.exists()  # this process's own earlier attempt (it is not writing there now) goes too
