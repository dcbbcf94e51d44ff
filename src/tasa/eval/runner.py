"""Run one task on a loaded model and score it; compare with a reference run.

Every task yields its metrics (with standard errors), the item count, seconds
and per-item records.  The records are what flip rates against a reference
are computed from; for perplexity the model's top-k next-token log-probs play
that role (KL divergence).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from tasa.errors import TasaError
from tasa.eval.lm import greedy_generate, loglikelihoods
from tasa.eval.metrics import flips, generation_scores, mean_stderr, multiple_choice, ratio_stderr
from tasa.eval.tasks import Task

@dataclass
class TaskResult:
    task: str
    metrics: dict
    samples: list[dict] = field(default_factory=list)
    topk: dict | None = None  # perplexity: top-k log-probs, for KL against this run


def apply_chat_template(tokenizer, contexts: list[str]) -> list[str]:
    """Each context as one user turn of the model's chat template, followed by the generation prompt."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise TasaError("this model's tokenizer has no chat template; drop --apply-chat-template")
    return [tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                          add_generation_prompt=True) for c in contexts]


def _add(metrics: dict, name: str, values: list[float]) -> None:
    metrics[name], metrics[f"{name}_stderr"] = mean_stderr(values)


@dataclass(frozen=True)
class Prompting:
    """How prompts are presented and scored: wrapped in the model's chat template as one user turn or not;
    each context's KV cache shared by its continuations (``prefix_cache``) or every continuation scored as its
    own sequence."""

    chat_template: bool = False
    prefix_cache: bool = True


def run_task(model, tokenizer, task: Task, limit: int | None = None, num_fewshot: int | None = None,
             batch_size: int = 16, generate: bool = True, gold_nll: bool = True, progress: bool = True,
             prompting: Prompting = Prompting()) -> TaskResult:
    """Evaluate ``task``; ``generate=False`` skips generation, ``gold_nll=False`` the gold-text NLL pass."""
    t0 = time.perf_counter()
    docs = task.select(limit)
    contexts = task.contexts(docs, num_fewshot)
    prefix_cache = prompting.prefix_cache
    if prompting.chat_template:
        contexts = apply_chat_template(tokenizer, contexts)
    delim = task.target_delimiter
    metrics: dict = {}
    samples: list[dict] = []
    if task.kind == "multiple_choice":
        requests, spans = [], []
        for doc, ctx in zip(docs, contexts):
            choices = task.doc_to_choices(doc)
            spans.append((len(requests), len(choices)))
            requests += [(ctx, delim + c) for c in choices]
        lls = loglikelihoods(model, tokenizer, requests, batch_size, prefix_cache, progress, desc=task.name)
        for i, (doc, (start, n)) in enumerate(zip(docs, spans)):
            item_lls, gold = [x.logprob for x in lls[start:start + n]], task.doc_to_gold(doc)
            samples.append({"doc": i, "lls": item_lls, "gold": gold,
                            **multiple_choice(item_lls, task.doc_to_choices(doc), gold)})
        for name in ("acc", "acc_norm", "gold_logprob", "margin"):
            _add(metrics, name, [s[name] for s in samples])
    else:
        samples = [{"doc": i} for i in range(len(docs))]
        targets = [task.doc_to_target(d) for d in docs]
        if gold_nll and any(targets):
            reqs = [(c, delim + t) for c, t in zip(contexts, targets) if t]
            scored = iter(loglikelihoods(model, tokenizer, reqs, batch_size, prefix_cache, progress,
                                         desc=f"{task.name} gold"))
            for s, t in zip(samples, targets):
                if t:
                    r = next(scored)
                    s["gold_nll"], s["gold_tokens"] = -r.logprob, r.tokens
            with_gold = [s for s in samples if "gold_nll" in s]
            metrics["gold_nll"], metrics["gold_nll_stderr"] = ratio_stderr(
                [s["gold_nll"] for s in with_gold], [s["gold_tokens"] for s in with_gold])
            metrics["gold_tokens"] = sum(s["gold_tokens"] for s in with_gold)
        if task.kind == "generation" and generate:
            responses = greedy_generate(model, tokenizer, contexts, task.until, task.max_new_tokens,
                                        batch_size, progress, desc=task.name)
            for s, doc, resp in zip(samples, docs, responses):
                s["response"] = resp
                s.update(generation_scores(resp, task.doc_to_answer(doc), task.answer_patterns, task.answer_ignore))
            for name in task.answer_patterns:
                _add(metrics, name, [s[name] for s in samples])
    metrics["n"] = len(docs)
    metrics["seconds"] = time.perf_counter() - t0
    return TaskResult(task.name, metrics, samples)


def primary_metric(task: Task) -> str | None:
    """The per-item correctness compared for flip rates: acc, or a generation task's first answer metric."""
    if task.kind == "multiple_choice":
        return "acc"
    if task.kind == "generation" and task.answer_patterns:
        return next(iter(task.answer_patterns))
    return None


def add_flips(result: TaskResult, task: Task, reference_samples: list[dict]) -> None:
    """Flip rate of ``result`` against a reference run's per-item records of the same task."""
    metric = primary_metric(task)
    if metric is None or not result.samples or metric not in result.samples[0]:
        return
    if len(reference_samples) != len(result.samples):
        raise TasaError(f"the reference scored {len(reference_samples)} items of {task.name}, this run "
                        f"{len(result.samples)}; use the same --limit")
    if reference_samples and metric not in reference_samples[0]:
        raise TasaError(f"the reference's {task.name} records have no {metric!r}")
    f = flips([s[metric] for s in reference_samples], [s[metric] for s in result.samples])
    result.metrics.update({"flip_metric": metric, **f})
