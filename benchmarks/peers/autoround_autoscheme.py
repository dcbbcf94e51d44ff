"""Peer worker, run inside the AutoRound environment (auto-round 0.16, not tasa's).

The bit-width of each linear layer is one of:
- ``--avg-bits B``: AutoRound's AutoScheme chooses it under an average-bits budget (first-order score
  sum |grad x (W - Q(W))| with every layer at each candidate scheme, then a knapsack);
- ``--bits B``: every linear of the decoder layers at B bits (AutoRound's own uniform quantization);
- ``--layer-bits FILE``: a json {linear name: bits} (another tool's plan, e.g. tasa's), passed to AutoRound
  as its per-layer ``layer_config``.
AutoRound then quantizes the model at those bit-widths (sign-gradient tuning of rounding and clipping,
``--iters`` steps per block), symmetric integer grids of ``--group-size``.

Calibration: AutoRound reads text, not token ids, so the caller's calibration windows are
decoded and written as a jsonl file; each line also carries the start of the next window, so
that AutoRound's re-tokenization (truncated to --seqlen, shorter samples dropped) keeps all of
them. The share of windows whose first --seqlen tokens survive the round trip unchanged is
reported ("calib_token_match").

Writes ``--out`` (safetensors: the fake-quantized, i.e. quantized then dequantized, float
weight of every quantized linear, as AutoRound computed it) and ``--out``.layers.json (the
bits AutoScheme gave each linear). Prints one JSON line: seconds (scheme search, tuning),
peak RSS, average bits, module count.
"""
import argparse
import json
import os
import resource
import sys
import tempfile
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", required=True)
    p.add_argument("--calib", required=True, help="torch file holding an int64 (N, T) tensor")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--avg-bits", type=float, help="AutoScheme's budget")
    how.add_argument("--bits", type=int, help="uniform bit-width")
    how.add_argument("--layer-bits", help="json file {linear name: bits}")
    p.add_argument("--options", default="3,4,8", help="candidate bit-widths")
    p.add_argument("--group-size", type=int, required=True)
    p.add_argument("--iters", type=int, default=200, help="AutoRound tuning steps per block (its default)")
    p.add_argument("--scheme-nsamples", type=int, default=16, help="AutoScheme's own samples (its default 16)")
    p.add_argument("--scheme-seqlen", type=int, default=256, help="AutoScheme's sequence length (default 256)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device-map", default="cpu", help="AutoRound's device_map: cpu, cuda, 0, ... (default: cpu)")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from auto_round import AutoRound, AutoScheme
    from auto_round.schemes import QuantizationScheme
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    ids = torch.load(args.calib, weights_only=True)
    n, seqlen = ids.shape
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    lines, match = [], 0
    for i in range(n):
        text = tok.decode(ids[i]) + tok.decode(ids[(i + 1) % n][:32])
        again = tok(text, add_special_tokens=False).input_ids[:seqlen]
        match += again == ids[i].tolist()
        lines.append(json.dumps({"text": text}))
    tmp = tempfile.mkdtemp(prefix="ar-calib-")
    data = os.path.join(tmp, "calib.jsonl")
    with open(data, "w") as f:
        f.write("\n".join(lines) + "\n")

    def grid(bits: int) -> QuantizationScheme:
        return QuantizationScheme(bits=bits, group_size=args.group_size, sym=True, data_type="int")

    layer_config = None
    if args.avg_bits is not None:
        scheme = AutoScheme(avg_bits=args.avg_bits, options=[grid(int(b)) for b in args.options.split(",")],
                            dataset=data, nsamples=args.scheme_nsamples, seqlen=args.scheme_seqlen,
                            ignore_scale_zp_bits=True, device_map=args.device_map)
    elif args.bits is not None:
        scheme = grid(args.bits)
    else:
        with open(args.layer_bits) as f:
            planned = json.load(f)
        scheme = grid(max(planned.values()))
        layer_config = {name: {"bits": int(b), "group_size": args.group_size, "sym": True, "data_type": "int"}
                        for name, b in planned.items()}
    t0 = time.perf_counter()
    ar = AutoRound(args.model_dir, scheme=scheme, layer_config=layer_config, dataset=data, nsamples=n, seqlen=seqlen,
                   iters=args.iters, batch_size=args.batch_size, seed=args.seed, device_map=args.device_map)
    model, layer_config = ar.quantize()
    seconds = time.perf_counter() - t0

    weights, bits = {}, {}
    for name, mod in model.named_modules():
        cfg = layer_config.get(name)
        if isinstance(mod, torch.nn.Linear) and cfg and int(cfg.get("bits", 16)) < 16:
            weights[name + ".weight"] = mod.weight.detach().float().contiguous()
            bits[name] = int(cfg["bits"])
    if not weights:
        raise SystemExit("AutoRound quantized no linear layer")
    numel = {k[:-len(".weight")]: v.numel() for k, v in weights.items()}
    avg = sum(bits[k] * numel[k] for k in bits) / sum(numel.values())
    save_file(weights, args.out)
    with open(args.out + ".layers.json", "w") as f:
        json.dump({"bits": bits, "average_bits": avg}, f, indent=1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"seconds": seconds, "peak_rss_gb": peak, "average_bits": avg, "modules": len(weights),
                      "calib_token_match": match / n}))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
