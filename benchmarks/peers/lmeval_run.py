"""Worker run inside the lm-eval 0.4.13 venv: evaluate a local HF model on lm-eval's own task
definitions, pointed at the local data files, and print one JSON line with per-item records.

    python lmeval_run.py --model DIR --task arc_easy --limit 500 --num-fewshot 0 --batch-size 8 \
        --data-dir ../shared/data --work DIR

Each local task `include`s lm-eval's installed YAML of the same name (prompt, delimiters,
few-shot settings, metrics, filters unchanged) and only swaps the dataset for local JSON
files; ARC rows are converted from the original AI2 layout to the Hugging Face one.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

UTILS = '''
def process_arc(dataset):
    def convert(row):
        q = row["question"]
        return {"question": q["stem"],
                "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]},
                "answerKey": row["answerKey"]}
    return dataset.map(convert, remove_columns=dataset.column_names)
'''


def write_task(work: Path, task: str, data_dir: Path) -> str:
    import lm_eval

    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    work.mkdir(parents=True, exist_ok=True)
    (work / "utils.py").write_text(UTILS)
    name = f"{task}_local"
    if task.startswith("arc_"):
        base = tasks_dir / "arc" / "arc_easy.yaml"
        splits = {"train": "train", "validation": "validation", "test": "test"}
        extra = "process_docs: !function utils.process_arc\n"
    elif task == "gsm8k":
        base = tasks_dir / "gsm8k" / "gsm8k.yaml"
        splits = {"train": "train", "test": "test"}
        extra = ""
    else:
        raise SystemExit(f"unsupported task {task}")
    files = "".join(f"    {s}: {data_dir / task / (f + '.jsonl')}\n" for s, f in splits.items())
    (work / f"{name}.yaml").write_text(
        f"include: {base}\ntask: {name}\ntag: []\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n{files}{extra}")
    return name


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--limit", type=int, required=True)
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--work", required=True)
    args = p.parse_args()
    t0 = time.perf_counter()
    import lm_eval
    from lm_eval.tasks import TaskManager

    name = write_task(Path(args.work), args.task, Path(args.data_dir).resolve())
    tm = TaskManager(include_path=args.work)
    t1 = time.perf_counter()
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={args.model},dtype=float32,device=cpu",
                                  tasks=[name], num_fewshot=args.num_fewshot, limit=args.limit,
                                  batch_size=args.batch_size, log_samples=True, task_manager=tm)
    t2 = time.perf_counter()
    res = out["results"][name]
    items: dict = {}
    for s in out["samples"][name]:
        rec = items.setdefault(s["doc_id"], {"doc_id": s["doc_id"]})
        if args.task == "gsm8k":
            rec[s["filter"]] = s["exact_match"]
            rec["response"] = s["resps"][0][0]
        else:
            rec.update(acc=s["acc"], acc_norm=s["acc_norm"], lls=[float(r[0][0]) for r in s["resps"]])
    print(json.dumps({"results": {k: v for k, v in res.items() if isinstance(v, (int, float))},
                      "items": [items[k] for k in sorted(items)], "seconds_total": t2 - t0,
                      "seconds_evaluate": t2 - t1, "version": lm_eval.__version__ if hasattr(lm_eval, "__version__")
                      else None}))


if __name__ == "__main__":
    main()
