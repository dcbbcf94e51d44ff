"""tasa run --time-budget: the best quantizer whose time fits what the budget leaves.

The candidates come best first, the last one (the default) taken when nothing before it fits.  Each other candidate
is timed on the run's own model, plan and calibration: it quantizes the first decoder layer (calibration set-up
included) and stops; its time for the whole model is projected from that layer (:func:`projected_seconds`).  A
trial has a deadline, the first-layer time beyond which the projection cannot fit what is left once the trial is
paid for, and is stopped at the first cancel point past it (tasa.cancel): a candidate that does not fit costs about
1 / (layers + 1) of what is left.  The trial's work is thrown away (the layer is restored) and its time taken from
what the budget leaves.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


def projected_seconds(first_layer: float, layers: int, last_layer_factor: float = 1.0) -> float:
    """A quantizer's time over ``layers`` decoder layers from its first one's (``first_layer`` seconds, its
    set-up included, so the projection errs long): every layer as the first, the last ``last_layer_factor``
    times it (learned rounding's last layer on the output distribution also runs the model's head)."""
    if first_layer < 0 or layers < 1 or last_layer_factor < 1:
        raise ValueError(f"bad projection inputs: {first_layer}, {layers}, {last_layer_factor}")
    return first_layer * (layers - 1 + last_layer_factor)


def head_factor(layer_numel: int, head_numel: int) -> float:
    """How many times a first layer's time the last one takes when each of its steps also runs the head: one
    plus the head's weights over the layer's (an upper bound: the layer's GPTQ share does not grow)."""
    if layer_numel < 1 or head_numel < 0:
        raise ValueError(f"bad sizes: layer {layer_numel}, head {head_numel}")
    return 1.0 + head_numel / layer_numel


@dataclass(frozen=True)
class Candidate:
    """A quantizer to choose: its name (as records write it), what it is (e.g. a QuantizeSpec) and the factor
    of its last layer's time over its first's (:func:`projected_seconds`)."""

    name: str
    spec: object
    last_layer_factor: float = 1.0


@dataclass(frozen=True)
class Choice:
    """The chosen candidate, the seconds the budget left before the trials, and each trial as a dict (name,
    deadline, its seconds, first-layer seconds or None where stopped at the deadline, projected seconds, seconds
    left once it ran, fits)."""

    candidate: Candidate
    seconds_left: float
    trials: list[dict] = field(default_factory=list)

    def describe(self) -> str:
        """One sentence: what was chosen, and why."""
        def trial(t: dict) -> str:
            if t["first_layer_seconds"] is None:
                return (f"trial of {t['name']}: its first layer stopped at the deadline of "
                        f"{t['deadline_seconds']:.1f} s, past which its projection could not fit")
            return (f"trial of {t['name']}: its first layer took {t['first_layer_seconds']:.1f} s, projecting "
                    f"{t['projected_seconds']:.0f} s against {t['seconds_left']:.0f} s left"
                    f"{' (fits)' if t['fits'] else ''}")
        left = f"{self.seconds_left:.0f} s of the budget left for quantizing" if self.seconds_left > 0 else \
            "the budget already spent before quantizing"
        return f"{self.candidate.name} ({'; '.join([left, *map(trial, self.trials)])})"


def choose(candidates: Sequence[Candidate], seconds_left: float, layers: int,
           trial: Callable[[Candidate, float], tuple[float, bool]]) -> Choice:
    """The first of ``candidates`` (best first) whose projected time fits ``seconds_left`` once its trial ran,
    else the last.  ``trial(candidate, deadline)`` quantizes the first of the model's ``layers`` layers by it,
    stopped past ``deadline`` seconds (past which the projection cannot fit), and returns its seconds and whether
    it finished.  No trial runs when the budget is already spent; none for the last candidate."""
    if not candidates:
        raise ValueError("no quantizer to choose from")
    trials: list[dict] = []
    left = seconds_left
    for c in candidates[:-1]:
        if left <= 0:
            break
        # first * (layers - 1 + factor) <= left - first
        deadline = left / (layers + c.last_layer_factor)
        seconds, finished = trial(c, deadline)
        left -= seconds
        first = seconds if finished else None
        projected = None if first is None else projected_seconds(first, layers, c.last_layer_factor)
        trials.append({"name": c.name, "deadline_seconds": deadline, "trial_seconds": seconds,
                       "first_layer_seconds": first, "projected_seconds": projected, "seconds_left": left,
                       "fits": projected is not None and projected <= left})
        if trials[-1]["fits"]:
            return Choice(c, seconds_left, trials)
    return Choice(candidates[-1], seconds_left, trials)
