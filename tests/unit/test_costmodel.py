"""The placement cost model (tasa.distributed.costmodel): exact small cases and invariants."""
import pytest

from tasa.distributed.costmodel import (ProbeCosts, balanced_slices, pipeline_makespan, serial_seconds,
                                        task_makespan)


def test_serial_and_one_worker_by_hand():
    c = ProbeCosts(layers=2, probes_per_layer=1, layer=1.0, head=1.0)
    # base 3 (2 layers + head); probes 3 (layer 0) and 2 (layer 1); one layer pass advancing the inputs
    assert serial_seconds(c) == 9.0
    # a worker: probe 0 from 3 to 6; layer 1's inputs ready at 4 (this process advances meanwhile); probe 1 6..8
    assert task_makespan(c, 1) == 8.0
    assert pipeline_makespan(c, 1) == 8.0  # one stage: the same work in the same order


def test_task_placement_with_transfers_and_many_workers():
    c = ProbeCosts(layers=3, probes_per_layer=2, layer=1.0, head=0.5, quant=0.25, transfer=0.5, put=0.1)
    # enough workers: every probe starts when its layer is ready (+ a fetch); the latest one ends last
    ready = [c.put + c.transfer + c.base / 6 + c.put * (l + 1) + c.layer * l for l in range(3)]
    assert task_makespan(c, 6) == pytest.approx(max(r + c.transfer + c.probe(l) for l, r in enumerate(ready)))
    times = [task_makespan(c, w) for w in range(1, 7)]
    assert all(a >= b for a, b in zip(times, times[1:]))  # more workers never slower
    with pytest.raises(ValueError):
        task_makespan(c, 0)


def test_balanced_slices_minimise_the_largest_stage():
    c = ProbeCosts(layers=4, probes_per_layer=1, layer=1.0, head=0.0)
    # layer j is run by the probes of layers 0..j: work 1, 2, 3, 4; best cut: [1+2+3 | 4] (6) not [1+2 | 3+4] (7)
    assert balanced_slices(c, 2) == [(0, 3), (3, 4)]
    assert balanced_slices(c, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    heavy_head = ProbeCosts(layers=4, probes_per_layer=1, layer=1.0, head=10.0)  # 4 heads on the last stage
    assert balanced_slices(heavy_head, 2) == [(0, 3), (3, 4)]
    assert balanced_slices(ProbeCosts(layers=4, probes_per_layer=1, layer=1.0, head=1.0), 2) == [(0, 3), (3, 4)]
    with pytest.raises(ValueError):
        balanced_slices(c, 5)


def test_pipeline_by_hand_and_its_checks():
    c = ProbeCosts(layers=2, probes_per_layer=1, layer=1.0, head=1.0, transfer=0.5)
    # stages [0,1) and [1,2); full-precision pass: 1 + hop 0.5 + 1 + head 1 = 3.5
    # probe of layer 0: stage 0 3.5..4.5, hop, stage 1 (layer + head) 5..7; probe of layer 1: stage 1 7..9
    assert pipeline_makespan(c, 2) == 9.0
    with pytest.raises(ValueError, match="contiguously"):
        pipeline_makespan(c, 2, [(0, 1), (0, 2)])


def test_many_probes_keep_eight_task_workers_busy():
    """A Llama-3-8B-like profile (32 layers, 3 bit-widths): 8 workers give more than 7x one worker."""
    c = ProbeCosts(layers=32, probes_per_layer=3, layer=1.0, head=0.5, quant=0.2, transfer=0.05, put=0.02)
    assert task_makespan(c, 1) / task_makespan(c, 8) > 7.0


def test_pipeline_replicas_share_the_probes():
    c = ProbeCosts(layers=2, probes_per_layer=2, layer=1.0, head=1.0)
    # one pipeline of one stage: fp 3, then probes 3, 3, 2, 2 in turn -> 13; two replicas: each takes every
    # other probe (3 then 2) -> 3 + 5 = 8
    assert pipeline_makespan(c, 1) == 13.0
    assert pipeline_makespan(c, 1, replicas=2) == 8.0
    with pytest.raises(ValueError, match="replicas"):
        pipeline_makespan(c, 1, replicas=0)
