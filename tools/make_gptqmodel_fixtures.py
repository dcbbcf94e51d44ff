"""Write tests/fixtures/gptqmodel/: tiny GPTQ checkpoints made by GPTQModel 7.6.0, with GPTQModel's own
dequantized weights, so the tests check tasa's GPTQ reader and writer against the peer without installing it.

Run once by a maintainer, with tasa's environment and GPTQModel's (`make test` builds .venv-gptqmodel):

    .venv/bin/python tools/make_gptqmodel_fixtures.py [--gptqmodel-python .venv-gptqmodel/bin/python]

It builds a one-layer random Llama (hidden 64, vocabulary 260) in tasa's environment, then, in GPTQModel's
(benchmarks/peers/gptqmodel_quantize.py), quantizes it under each configuration of CONFIGS on fixed random
calibration tokens (GPTQModel's GPTQ, CPU, batch size 8), saves the checkpoint, loads it back with GPTQModel
(TORCH backend) and stores every linear's weight as GPTQModel dequantizes it (``dequantize_weight()``,
float16; a module GPTQModel skipped keeps its float weight).  Each fixture folder holds: model.safetensors, config.json, quantize_config.json (the checkpoint, as
GPTQModel wrote it, less its tokenizer files and the tensors outside the decoder layers) and
gptqmodel_dequantized.safetensors.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT / "benchmarks" / "peers" / "gptqmodel_quantize.py"  # quantize, save, reload, dequantize
OUT = ROOT / "tests" / "fixtures" / "gptqmodel"
KEEP = ("model.safetensors", "config.json", "quantize_config.json")

# name -> QuantizeConfig keywords
CONFIGS = {
    **{f"sym{b}": {"bits": b, "group_size": 32, "sym": True} for b in (2, 3, 4, 8)},
    **{f"asym{b}": {"bits": b, "group_size": 32, "sym": False} for b in (2, 3, 4, 8)},
    "sym4_act_order": {"bits": 4, "group_size": 32, "sym": True, "desc_act": True},
    "asym3_act_order": {"bits": 3, "group_size": 32, "sym": False, "desc_act": True},
    "mixed_dynamic": {"bits": 4, "group_size": 32, "sym": True,
                      "dynamic": {r"+:.*\.mlp\.(gate|up)_proj": {"bits": 8},
                                  r"+:.*\.mlp\.down_proj": {"bits": 2, "group_size": 64},
                                  r"+:.*\.self_attn\.v_proj": {"bits": 3},
                                  r"-:.*\.self_attn\.o_proj": {}}},
}



def strip_to_layers(path: Path) -> None:
    """Keep only the decoder-layer tensors (the quantized ones among them, byte for byte): the embedding and
    head are most of a tiny model's bytes and the tests do not need them."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith("model.layers.")}
    save_file(tensors, str(path), metadata=meta)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gptqmodel-python", default=str(ROOT / ".venv-gptqmodel" / "bin" / "python"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.conftest import byte_tokenizer, tiny_llama

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "float"
        tiny_llama(seed=0, layers=1, hidden=64, vocab=260).save_pretrained(src)
        byte_tokenizer().save_pretrained(src)  # GPTQModel loads a tokenizer with the model
        calib = Path(tmp) / "calib.pt"
        torch.save(torch.randint(0, 256, (32, 64), generator=torch.Generator().manual_seed(0)), calib)
        OUT.mkdir(parents=True, exist_ok=True)
        for name, kw in CONFIGS.items():
            dequantized = Path(tmp) / f"{name}.safetensors"
            dest = Path(f"{dequantized}.gptq")  # the checkpoint the peer worker keeps
            proc = subprocess.run([args.gptqmodel_python, str(PEER), "--model-dir", str(src), "--calib", str(calib),
                                   "--bits", str(kw["bits"]), "--group-size", str(kw["group_size"]), "--damp", "0.05",
                                   "--qconfig", json.dumps(kw), "--float16", "--out", str(dequantized)],
                                  capture_output=True, text=True, env={**os.environ, "GPTQMODEL_CPU_WORKERS": "2"})
            if proc.returncode != 0:
                print(proc.stderr[-4000:], file=sys.stderr)
                return 1
            shutil.copy(dequantized, dest / "gptqmodel_dequantized.safetensors")
            final = OUT / name
            shutil.rmtree(final, ignore_errors=True)
            final.mkdir()
            for f in (*KEEP, "gptqmodel_dequantized.safetensors"):
                shutil.copy(dest / f, final / f)
            strip_to_layers(final / "model.safetensors")
            print(f"{name}: {proc.stdout.strip().splitlines()[-1]}")
    (OUT / "README.md").write_text(
        "# GPTQ checkpoints written by GPTQModel 7.6.0\n\nMade by `tools/make_gptqmodel_fixtures.py` (one-layer random "
        "Llama, hidden 64, vocabulary 260; GPTQModel's GPTQ on fixed random tokens, CPU). Each folder: the checkpoint "
        "as GPTQModel wrote it (tokenizer, embedding, final norm and head dropped) and `gptqmodel_dequantized.safetensors`, every decoder linear as "
        "GPTQModel's TORCH kernel dequantizes it (float16). Configurations:\n\n"
        + "".join(f"- `{n}`: `{json.dumps(kw)}`\n" for n, kw in CONFIGS.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
