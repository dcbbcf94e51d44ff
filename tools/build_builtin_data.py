"""Build tasa's built-in datasets (src/tasa/data/builtin/) from verified original files.

Run once by a maintainer, with the folder that holds the verified originals
(layout ``<dataset>/<split>.<ext>``, e.g. the workspace's shared data folder):

    python tools/build_builtin_data.py /path/to/verified/data

Each split the built-in sources use is stored xz-compressed (``<dataset>/<split>.<ext>.xz``,
deterministic: the same input gives the same bytes); ``MANIFEST.json`` records, per file, the
sha256 and size of the original bytes, its row count, source and licence.  tasa checks the sha256
of every file it decompresses (tasa.data.store), so a damaged copy is refused, never read.
The product, the tests and CI read only the package copy; this script is the one place that reads
the originals.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "tasa" / "data" / "builtin"

WIKI = "WikiText-2 raw (wikitext-2-raw-v1), Merity et al. 2016"
GSM = "GSM8K, Cobbe et al. 2021 (openai/grade-school-math)"
ARC = "AI2 Reasoning Challenge (ARC-V1-Feb2018), Clark et al. 2018"
MMLU = "MMLU, Hendrycks et al. 2021 (57 subjects, HF cais/mmlu field names)"
MBPP = "MBPP, Austin et al. 2021 (google-research mbpp.jsonl)"

# file -> (dataset description, licence, source of the verified copy)
FILES = {
    "wikitext2/validation.txt": (WIKI, "CC BY-SA 3.0",
                                 "wiki.valid.raw, byte for byte; DRAGNLabs/LLMHumanModeling:data/wiki.valid.raw"
                                 "@67cb89ec83ca316877b9101d6b8b1227aa7cf8e4"),
    "wikitext2/test.txt": (WIKI, "CC BY-SA 3.0",
                           "wiki.test.raw, byte for byte; DRAGNLabs/LLMHumanModeling:data/wiki.test.raw"
                           "@67cb89ec83ca316877b9101d6b8b1227aa7cf8e4"),
    "gsm8k/train.jsonl": (GSM, "MIT", "openai/grade-school-math:grade_school_math/data/train.jsonl"
                                      "@3101c7d5072418e28b9008a6636bde82a006892c"),
    "gsm8k/test.jsonl": (GSM, "MIT", "openai/grade-school-math:grade_school_math/data/test.jsonl"
                                     "@3101c7d5072418e28b9008a6636bde82a006892c"),
    **{f"{d}/{s}.jsonl": (ARC, "CC BY-SA 4.0",
                          f"RazvanDu/TemporalRNNs:{up}/{up}-{orig}.jsonl@93811e3f9f8c5c1f63650153541cd6c626dafcc0")
       for d, up in (("arc_easy", "ARC-Easy"), ("arc_challenge", "ARC-Challenge"))
       for s, orig in (("train", "Train"), ("validation", "Dev"), ("test", "Test"))},
    "mmlu/dev.jsonl": (MMLU, "MIT", "HaeChan0305/MLILAB-FedLLM:data/mmlu/dev/<subject>_dev.csv"
                                    "@d92730e8bacd7b3a61e551e015e40588e10234b4, 57 CSVs concatenated"),
    "mmlu/test.jsonl": (MMLU, "MIT", "HaeChan0305/MLILAB-FedLLM:data/mmlu/test/<subject>_test.csv"
                                     "@d92730e8bacd7b3a61e551e015e40588e10234b4, 57 CSVs concatenated"),
    "mbpp/full.jsonl": (MBPP, "CC BY 4.0", "muitiiifruckt/ASE:mbpp.jsonl@83fa3f7963561b898623e8ade6e017d448ddca98"),
    "mbpp/test.jsonl": (MBPP, "CC BY 4.0", "task_id 11..510 of mbpp/full.jsonl (the standard test split)"),
}


def count_rows(name: str, data: bytes) -> int:
    lines = data.decode("utf-8").split("\n")  # not splitlines(): JSON strings may hold U+2028
    if lines and lines[-1] == "":
        lines.pop()
    if name.endswith(".jsonl"):
        return sum(1 for line in lines if line.strip())
    return len(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, help="folder holding the verified originals")
    args = ap.parse_args(argv)
    manifest = {"schema": 1, "compression": "xz", "files": {}}
    for rel, (dataset, licence, source) in FILES.items():
        src = args.source / rel
        if not src.is_file():
            print(f"build_builtin_data: missing {src}", file=sys.stderr)
            return 2
        data = src.read_bytes()
        packed = lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)
        dest = OUT / f"{rel}.xz"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(packed)
        manifest["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                                  "compressed_bytes": len(packed), "rows": count_rows(rel, data),
                                  "dataset": dataset, "licence": licence, "source": source}
        print(f"{rel}: {len(data):,} -> {len(packed):,} bytes, {manifest['files'][rel]['rows']} rows")
    (OUT / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(f["compressed_bytes"] for f in manifest["files"].values())
    print(f"{len(manifest['files'])} files, {total:,} bytes compressed, in {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
