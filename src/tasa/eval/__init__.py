"""Evaluation: perplexity, tasks (lm-eval-compatible prompts and scoring), comparison with a reference."""
from tasa.eval.lm import encode_pair, greedy_generate, loglikelihoods
from tasa.eval.perplexity import PerplexityResult, perplexity
from tasa.eval.runner import TaskResult, run_task
from tasa.eval.tasks import Task, get_task, load_task_spec, task_names

__all__ = ["PerplexityResult", "perplexity", "encode_pair", "greedy_generate", "loglikelihoods", "TaskResult",
           "run_task", "Task", "get_task", "load_task_spec", "task_names"]
