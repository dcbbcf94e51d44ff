"""Run inside GPTQModel's environment: load a GPTQ checkpoint with GPTQModel (TORCH backend, CPU) and print
the logits of the given token ids as JSON, with the bit-width GPTQModel gave every quantized module."""
import json
import os
import sys

import torch


def main() -> None:
    path, ids = sys.argv[1], json.loads(sys.argv[2])
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import BACKEND, GPTQModel

    model = GPTQModel.load(path, backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
    bits = {n: int(m.bits) for n, m in model.model.named_modules() if hasattr(m, "qweight")}
    with torch.no_grad():
        logits = model.model(input_ids=torch.tensor(ids)).logits.float()
    print(json.dumps({"logits": logits.tolist(), "bits": bits}))
    sys.stdout.flush()
    os._exit(0)  # skip GPTQModel's slow worker-thread teardown


if __name__ == "__main__":
    main()
