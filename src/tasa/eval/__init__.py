"""Evaluation: perplexity (and, later, task evaluators and reports)."""
from tasa.eval.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
