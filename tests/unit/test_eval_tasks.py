"""Task prompts and few-shot contexts (lm-eval 0.4.x formats), user task specs, task runs and references."""
import json
import random

import pytest

from tasa.errors import TasaError
from tasa.eval.lm import loglikelihoods
from tasa.eval.metrics import multiple_choice
from tasa.eval.runner import add_flips, run_task
from tasa.eval.tasks import get_task, load_task_spec
from tests.conftest import arc_row, tiny_llama


def test_arc_zero_shot_prompt_and_odd_rows(data_dir):
    task = get_task("arc_easy")
    docs = task.select(None)
    assert len(docs) == 8
    assert task.contexts(docs[:1], 0) == ["Question: which the number 0?\nAnswer:"]
    # 3 and 5 choices, numeric labels: gold is the index of answerKey among the labels
    assert [len(d["choices"]) for d in docs[:4]] == [4, 3, 5, 4]
    assert docs[3]["labels"] == ["1", "2", "3", "4"] and docs[3]["gold"] == 3
    assert task.doc_to_target(docs[1]) == docs[1]["choices"][1 % 3]


def test_arc_few_shot_follows_lm_eval_sampler(data_dir):
    task = get_task("arc_easy")
    docs = task.select(3)
    pool = task.fewshot_docs()
    rng = random.Random(1234)  # lm-eval: one generator for the task, drawn in document order
    expected = []
    for d in docs:
        shots = rng.sample(pool, 2)
        ctx = "".join(f"Question: {s['question']}\nAnswer: {s['choices'][s['gold']]}\n\n" for s in shots)
        expected.append(ctx + f"Question: {d['question']}\nAnswer:")
    assert task.contexts(docs, 2) == expected


def test_mmlu_description_first_n_shots_and_per_subject_limit(data_dir):
    task = get_task("mmlu")
    docs = task.select(2)
    assert [d["subject"] for d in docs] == ["college_physics"] * 2 + ["virology"] * 2
    ctx = task.contexts(docs[2:3], 1)[0]
    assert ctx == ("The following are multiple choice questions (with answers) about virology.\n\n"
                   "virology dev question 0?\nA. c0\nB. c1\nC. c2\nD. c3\nAnswer: A\n\n"
                   "virology test question 0?\nA. c0\nB. c1\nC. c2\nD. c3\nAnswer:")
    with pytest.raises(TasaError, match="exceeds the rows of every mmlu group"):
        task.select(7)
    with pytest.raises(TasaError, match="5-shot needs|6-shot needs"):
        task.contexts(docs, 6)


def test_limit_and_fewshot_errors(data_dir):
    with pytest.raises(TasaError, match="--limit 9 exceeds the 8 rows of arc_easy"):
        get_task("arc_easy").select(9)
    with pytest.raises(TasaError, match="must be positive"):
        get_task("arc_easy").select(0)
    with pytest.raises(TasaError, match="unknown task 'hellaswag'"):
        get_task("hellaswag")
    with pytest.raises(TasaError, match="13-shot needs 13 examples, the few-shot pool has 12"):
        get_task("arc_easy").contexts(get_task("arc_easy").select(1), 13)


def test_malformed_rows_are_skipped_with_a_warning(data_dir, caplog):
    with open(data_dir / "arc_easy" / "test.jsonl", "a") as f:
        f.write(json.dumps({"id": "bad", "question": {"stem": "no choices"}, "answerKey": "A"}) + "\n")
        bad = arc_row(99)
        bad["answerKey"] = "Z"
        f.write(json.dumps(bad) + "\n")
    docs = get_task("arc_easy").select(None)
    assert len(docs) == 8
    assert "skipped 2 malformed arc_easy row(s), first at row 9" in caplog.text
    with open(data_dir / "arc_easy" / "test.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(TasaError, match=r"test.jsonl:11: malformed JSON"):
        get_task("arc_easy").select(None)


def test_gsm8k_few_shot_context(data_dir):
    task = get_task("gsm8k")
    docs = task.select(2)
    pool = task.fewshot_docs()
    rng = random.Random(1234)
    shots = rng.sample(pool, 5)
    ctx = task.contexts(docs, None)[0]
    assert ctx == "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots) + \
        f"Question: {docs[0]['question']}\nAnswer:"


def _write_spec(tmp_path, spec, rows, name="task.yaml"):
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / name
    if name.endswith(".json"):
        path.write_text(json.dumps(spec))
    else:
        import yaml

        path.write_text(yaml.safe_dump(spec))
    return path


def test_user_multiple_choice_task(tmp_path, tokenizer):
    rows = [{"q": "2+2?", "opts": ["3", "4", "5"], "ans": 1}, {"q": "sky?", "opts": ["blue", "green"], "ans": "A"},
            {"q": "bad", "opts": "not a list", "ans": 0}, {"q": "x?", "opts": ["yes", "no"], "ans": "no"}]
    path = _write_spec(tmp_path, {"name": "quiz", "kind": "multiple_choice", "data": "rows.jsonl",
                                  "prompt": "Q: {q}\nA:", "choices": "opts", "answer": "ans"}, rows)
    task = load_task_spec(path)
    docs = task.select(None)
    assert [task.doc_to_gold(d) for d in docs] == [1, 0, 1]  # the malformed row is skipped
    assert task.contexts(docs[:1], 0) == ["Q: 2+2?\nA:"]
    model = tiny_llama()
    res = run_task(model, tokenizer, task, progress=False)
    lls = loglikelihoods(model, tokenizer, [("Q: 2+2?\nA:", " " + c) for c in ["3", "4", "5"]], progress=False)
    first = multiple_choice([x.logprob for x in lls], ["3", "4", "5"], 1)
    assert res.samples[0]["acc"] == first["acc"] and res.samples[0]["margin"] == pytest.approx(first["margin"])
    assert res.metrics["n"] == 3 and "acc_norm_stderr" in res.metrics
    assert res.metrics["acc"] == pytest.approx(sum(s["acc"] for s in res.samples) / 3)


def test_user_generation_and_gold_nll_tasks(tmp_path, tokenizer):
    rows = [{"question": f"what is {i}+{i}?", "solution": f"{i}+{i}={2 * i}. The answer is {2 * i}", "final": 2 * i}
            for i in range(4)]
    path = _write_spec(tmp_path, {"kind": "generation", "data": "rows.jsonl", "prompt": "Q: {question}\nA:",
                                  "answer": "final", "answer_regex": r"answer is (\d+)", "target": "{solution}",
                                  "until": ["\n"], "max_new_tokens": 5, "num_fewshot": 1}, rows, "gen.json")
    task = load_task_spec(path)
    assert task.name == "gen" and task.fewshot_from_eval
    ctx = task.contexts(task.select(2), None)
    assert all(c.count("Q: ") == 2 for c in ctx)
    assert "Q: what is 0+0?\nA: 0+0=0" not in ctx[0]  # a document is never its own example
    res = run_task(tiny_llama(), tokenizer, task, progress=False)
    assert res.metrics["n"] == 4 and res.metrics["exact_match"] == 0.0
    assert res.metrics["gold_nll"] > 0 and res.metrics["gold_tokens"] > 0
    assert all("response" in s and "exact_match_answer" in s for s in res.samples)
    nll = load_task_spec(_write_spec(tmp_path, {"kind": "gold_nll", "data": "rows.jsonl", "prompt": "{question}",
                                                "target": "{solution}"}, rows, "nll.yaml"))
    res = run_task(tiny_llama(), tokenizer, nll, progress=False)
    assert set(res.metrics) >= {"gold_nll", "gold_nll_stderr", "gold_tokens", "n"}


@pytest.mark.parametrize("spec, message", [
    ({"kind": "multiple_choice", "data": "rows.jsonl"}, "missing required key 'prompt'"),
    ({"kind": "essay", "data": "rows.jsonl", "prompt": "{q}"}, "kind must be one of"),
    ({"kind": "gold_nll", "data": "rows.jsonl", "prompt": "{q}", "colour": 1}, "unknown key"),
    ({"kind": "gold_nll", "data": "rows.jsonl", "prompt": "{q}"}, "needs 'target'"),
    ({"kind": "generation", "data": "rows.jsonl", "prompt": "{q}", "answer": "a"}, "answer_regex"),
    ({"kind": "generation", "data": "rows.jsonl", "prompt": "{q}", "answer": "a", "answer_regex": "("},
     "bad answer_regex"),
    ({"kind": "gold_nll", "data": "missing.jsonl", "prompt": "{q}", "target": "{a}"}, "data file not found"),
    ({"kind": "gold_nll", "data": "rows.jsonl", "prompt": "{0}", "target": "{a}"}, "must name row fields"),
])
def test_user_task_spec_errors(tmp_path, spec, message):
    with pytest.raises(TasaError, match=message):
        load_task_spec(_write_spec(tmp_path, spec, [{"q": "x", "a": "y"}]))


def test_flips_against_reference_records(data_dir, tokenizer):
    task = get_task("arc_easy")
    res = run_task(tiny_llama(), tokenizer, task, limit=4, progress=False)
    add_flips(res, task, res.samples)
    assert res.metrics["flip_rate"] == 0.0
    flipped = [dict(s, acc=1.0 - s["acc"]) for s in res.samples]
    add_flips(res, task, flipped)
    assert res.metrics["flip_rate"] == 1.0
    with pytest.raises(TasaError, match="use the same --limit"):
        add_flips(res, task, flipped[:3])
