"""Peer worker, run inside the GPTQModel environment (not tasa's).

Quantizes a float Hugging Face model directory with GPTQModel on the given
calibration tokens and saves the GPTQ checkpoint; then loads that checkpoint
back with GPTQModel (TORCH backend), dequantizes every packed module to float
(W = dequantize_weight().T) and saves those weights as safetensors, so the
caller can evaluate GPTQModel's weights with exactly the same code as tasa's.
(The in-memory modules right after quantize() hold zero points in GPTQModel's
internal v2 convention; only the saved-and-loaded model dequantizes correctly.)

The GPTQ checkpoint itself is kept beside it, as OUT.gptq.

Prints one JSON line: {"seconds": quantization wall time, "peak_rss_gb", "modules"}.
"""
import argparse
import json
import os
import resource
import sys
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", required=True)
    p.add_argument("--calib", required=True, help="torch file holding an int64 (N, T) tensor")
    p.add_argument("--bits", type=int, required=True)
    p.add_argument("--group-size", type=int, required=True)
    p.add_argument("--damp", type=float, required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--act-group-aware", action="store_true")
    p.add_argument("--out", required=True, help="safetensors file for the dequantized linear weights")
    p.add_argument("--qconfig", default="{}",
                   help="JSON of further QuantizeConfig keywords (e.g. sym, desc_act, dynamic), applied last")
    p.add_argument("--float16", action="store_true",
                   help="store the dequantized weights in float16 (the TORCH kernel's own dtype) and also the "
                        "decoder linears GPTQModel left unquantized")
    args = p.parse_args()

    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from safetensors.torch import save_file

    ids = torch.load(args.calib, weights_only=True)
    calib = [{"input_ids": row.unsqueeze(0), "attention_mask": torch.ones_like(row).unsqueeze(0)} for row in ids]
    settings = dict(bits=args.bits, group_size=args.group_size, sym=True, desc_act=False,
                    act_group_aware=args.act_group_aware, damp_percent=args.damp, true_sequential=True,
                    offload_to_disk=False)
    qcfg = QuantizeConfig(**{**settings, **json.loads(args.qconfig)})
    model = GPTQModel.load(args.model_dir, qcfg, dtype=torch.float32, device="cpu")
    t0 = time.perf_counter()
    model.quantize(calib, batch_size=args.batch_size, backend=BACKEND.TORCH)
    seconds = time.perf_counter() - t0
    quant_dir = args.out + ".gptq"
    model.save(quant_dir)
    del model
    loaded = GPTQModel.load(quant_dir, backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
    weights = {}
    out_dtype = torch.float16 if args.float16 else torch.float32
    for name, mod in loaded.model.named_modules():
        if hasattr(mod, "qweight") and hasattr(mod, "dequantize_weight"):
            w = mod.dequantize_weight().t().contiguous().to(out_dtype)
            assert w.shape == (mod.out_features, mod.in_features), (name, tuple(w.shape))
            weights[name + ".weight"] = w
        elif args.float16 and isinstance(mod, torch.nn.Linear) and ".layers." in name:
            weights[name + ".weight"] = mod.weight.detach().to(out_dtype).contiguous()
    save_file(weights, args.out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"seconds": seconds, "peak_rss_gb": peak, "modules": len(weights)}))
    sys.stdout.flush()
    os._exit(0)  # skip slow interpreter teardown of GPTQModel's worker threads


if __name__ == "__main__":
    main()
