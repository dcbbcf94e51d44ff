"""Aggregation: normalisation and beta weighting on hand examples."""
import pytest

from tasa.allocate.aggregate import aggregate, normalise
from tasa.errors import TasaError

COSTS = {
    "wikitext2": {"3": [2.0, 0.0, 4.0], "4": [1.0, -0.5, 1.0]},  # mean at 3 bits: 2
    "gsm8k": {"3": [0.1, 0.3, 0.2], "4": [0.05, 0.0, 0.1]},  # mean at 3 bits: 0.2
    "arc_easy": {"3": [3.0, 3.0, 3.0], "4": [0.0, 3.0, 0.0]},  # mean at 3 bits: 3
}


def test_normalise_divides_by_mean_lowest_bit_cost_and_clips_negatives():
    n = normalise(COSTS["wikitext2"])
    assert n == {"3": [1.0, 0.0, 2.0], "4": [0.5, 0.0, 0.5]}
    assert normalise({"3": [0.0, -1.0]}) == {"3": [0.0, 0.0]}


def test_beta_weights_perplexity_against_the_tasks():
    ppl = aggregate(COSTS, beta="ppl-only")
    assert ppl == {"3": [1.0, 0.0, 2.0], "4": [0.5, 0.0, 0.5]}
    task = aggregate(COSTS, beta="task-only")  # mean of gsm8k [0.5,1.5,1] and arc [1,1,1] at 3 bits
    assert task["3"] == pytest.approx([0.75, 1.25, 1.0])
    half = aggregate(COSTS, beta=0.5)
    assert half["3"] == pytest.approx([0.875, 0.625, 1.5])
    weighted = aggregate(COSTS, beta=0.0, task_weights={"gsm8k": 3.0})
    assert weighted["4"] == pytest.approx([0.75 * 0.25 + 0.25 * 0.0, 0.0 * 0.75 + 0.25 * 1.0, 0.75 * 0.5])


def test_aggregate_errors():
    with pytest.raises(TasaError, match="beta must be in"):
        aggregate(COSTS, beta=1.5)
    with pytest.raises(TasaError, match="unknown preset"):
        aggregate(COSTS, beta="half")
    with pytest.raises(TasaError, match="no wikitext2"):
        aggregate({"gsm8k": COSTS["gsm8k"]}, beta=0.5)
    with pytest.raises(TasaError, match="has none"):
        aggregate({"wikitext2": COSTS["wikitext2"]}, beta=0.5)
    with pytest.raises(TasaError, match="not profiled"):
        aggregate(COSTS, task_weights={"mmlu": 1.0})
