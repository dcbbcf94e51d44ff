"""Helpers shared by the benchmarks: result schema, atomic row cache, peer environments."""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work"
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "src"))

from tasa.artifacts import read_json, write_json_atomic  # noqa: E402


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    gpu = ", ".join(gpus) if gpus else "no GPU"
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, {gpu}"


def row(name, tool, method, bits, group_size, calib, metrics, seconds) -> dict:
    return {"name": name, "tool": tool, "method": method, "bits": bits, "group_size": group_size, "calib": calib,
            "metrics": metrics, "seconds": seconds}


def write_results(benchmark: str, command: str, rows: list[dict], extra: dict | None = None,
                  path: Path | None = None) -> Path:
    """Write benchmark's record (``path``: elsewhere than benchmarks/results/BENCHMARK.json)."""
    out = path or RESULTS / f"{benchmark}.json"
    payload = {"benchmark": benchmark, "date": date.today().isoformat(), "machine": machine(), "command": command,
               "rows": rows}
    if extra:
        payload.update(extra)
    write_json_atomic(out, payload)
    return out


def chosen_rows(rows: str, names) -> list[str]:
    """The comma-separated ``--rows`` of a benchmark whose rows are ``names``; any other name is an error."""
    wanted = rows.split(",")
    if any(r not in names for r in wanted):
        raise SystemExit(f"--rows: each of {', '.join(names)}, got {rows!r}")
    return wanted


def parse_time_log(text: str) -> dict:
    """Wall seconds and peak RSS (GB) from GNU time -v output."""
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if not wall or not rss:
        raise SystemExit("the time log holds no GNU time -v summary")
    seconds = 0.0
    for part in wall.group(1).split(":"):
        seconds = seconds * 60 + float(part)
    return {"wall_seconds": seconds, "peak_rss_gb": int(rss.group(1)) / 2**20}


def cached(path: Path, compute) -> dict:
    """Return the JSON at ``path``, or compute it, write it atomically and return it (resumability)."""
    if path.is_file():
        return read_json(path)
    value = compute()
    write_json_atomic(path, value)
    return value


def recorded(records: Path, order: list[str], measured: dict[str, dict]) -> dict[str, dict]:
    """Every row with a record in ``records`` (this run's ``measured`` ones or earlier runs'), the rows of
    ``order`` first, then the others by name: a benchmark's summary json covers every row measured so far, not only
    the rows asked for now (a ``--rows`` subset must not drop the others from it)."""
    names = {p.stem for p in records.glob("*.json")} | set(measured)
    return {name: measured.get(name) or read_json(records / f"{name}.json")
            for name in [n for n in order if n in names] + sorted(names - set(order))}


GPTQMODEL_REQS = ["torch==2.13.0", "transformers==5.23.0", "gptqmodel==7.6.0"]  # the peer GPTQModel's environment


def peer_venv(name: str, requirements: list[str]) -> Path:
    """A virtual environment under benchmarks/.work for a peer tool; created once. Returns its python."""
    venv = WORK / f"{name}-venv"
    py = venv / "bin" / "python"
    stamp = venv / ".installed"
    wanted = "\n".join(requirements)
    if stamp.is_file() and stamp.read_text() == wanted:
        return py
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *requirements], check=True)
    stamp.write_text(wanted)
    return py


def run_json(cmd: list[str], env: dict | None = None, log: Path | None = None) -> dict:
    """Run a worker that prints one JSON object as its last stdout line."""
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.run(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"worker failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_or_work(doc: str, bench: str, worker, rows: list[str] | None = None, options=None):
    """A benchmark's command line. In a ``--worker NAME`` process (one row, in a fresh process) run
    ``worker(NAME, work dir)``, print its JSON and exit; otherwise return (args, work dir).
    ``options(parser)`` adds the benchmark's own arguments."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if rows is not None:
        ap.add_argument("--rows", default=",".join(rows), help="comma-separated subset of rows")
    if options is not None:
        options(ap)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = WORK / bench
    if args.worker:
        print(json.dumps(worker(args.worker, work)))
        raise SystemExit(0)
    return args, work


def score_model(lm, work: Path, reference: dict | None, limits: dict, seqlen: int) -> dict:
    """The benchmarks' held-out scores of a model: WikiText-2 perplexity on the first limits['wikitext2']
    windows of ``seqlen`` tokens with KL(FP || model) against ``reference`` (top-256 log-probs; with
    ``reference=None`` the model is the reference and its top-256 are saved to work/fp.topk.safetensors),
    ARC-Easy / ARC-Challenge acc and acc_norm (with stderr) and GSM8K gold-solution NLL, zero-shot, on the
    first limits[task] test rows."""
    from tasa.eval.runner import run_task
    from tasa.eval.tasks import get_task

    r = wikitext2(lm, work, reference, limits, seqlen)
    m = {"wikitext2_ppl": r.ppl}
    if r.kl is not None:
        m["wikitext2_kl"] = r.kl
    for task in ("arc_easy", "arc_challenge", "gsm8k"):
        res = run_task(lm.model, lm.tokenizer, get_task(task), limit=limits[task], num_fewshot=0, generate=False,
                       progress=False)
        if task == "gsm8k":
            m["gsm8k_gold_nll"] = res.metrics["gold_nll"]
        else:
            for k in ("acc", "acc_norm"):
                m[f"{task}_{k}"], m[f"{task}_{k}_stderr"] = res.metrics[k], res.metrics[f"{k}_stderr"]
    return m


def wikitext2(lm, work: Path, reference: dict | None, limits: dict, seqlen: int):
    """WikiText-2 perplexity of score_model; with ``reference=None`` the model's top-256 log-probs are
    saved to work/fp.topk.safetensors (the reference of later rows' KL), else KL to ``reference``."""
    from tasa.data import eval_texts
    from tasa.eval.perplexity import perplexity

    r = perplexity(lm.model, lm.tokenizer, "\n\n".join(eval_texts("wikitext2")), seqlen=seqlen,
                   limit=limits["wikitext2"], progress=False, topk=256 if reference is None else 0,
                   reference=reference)
    if reference is None:
        from safetensors.torch import save_file

        work.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in r.topk.items()}, str(work / "fp.topk.safetensors"))
    return r


def load_linear_weights(lm, arch, path: Path) -> None:
    """Copy a peer's (dequantized) linear weights, saved as safetensors, into the loaded float model."""
    from safetensors.torch import load_file

    weights = load_file(str(path))
    expected = {m.name + ".weight" for m in arch.modules}
    if set(weights) != expected:
        raise RuntimeError(f"{path.name}: {len(weights)} weights, expected the model's {len(expected)} linears")
    set_weights(lm, weights)


def set_weights(lm, weights: dict) -> None:
    """Copy ``weights`` (state-dict names) into the loaded model, in its dtype."""
    import torch

    state = lm.model.state_dict()
    with torch.no_grad():
        for k, v in weights.items():
            state[k].copy_(v)

