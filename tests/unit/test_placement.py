"""Several devices in one process (issue 36): decoder layers spread over devices in contiguous runs balanced by
bytes, each layer's inputs moved to its device and its outputs back to the primary.

This machine has no GPU: the tests spread models over ``cpu`` and ``cpu:0``, which torch treats as two distinct
devices (``torch.device("cpu:0") != torch.device("cpu")``) holding the same memory, so every hook and every placed
read runs as on two GPUs, and the results must equal the one-device results exactly."""
import itertools
import random

import pytest
import torch

from tasa.config import CalibSpec, QuantizeSpec, Runtime
from tasa.errors import TasaError
from tasa.models import load, resolve
from tasa.models import placement as placement_module
from tasa.models.placement import plan_placement, spread
from tasa.models.streaming import compute_device, streamer_of
from tasa.pipeline.quantize import quantize
from tests.conftest import byte_tokenizer, tiny_llama

CPU, OTHER = torch.device("cpu"), torch.device("cpu:0")


def test_spread_cuts_small_cases_exactly():
    assert spread([1, 1, 1, 1], 2) == [0, 0, 1, 1]
    assert spread([4, 1, 1, 1, 1], 2) == [0, 1, 1, 1, 1]
    assert spread([1, 1, 1, 1], 2, first_extra=2) == [0, 1, 1, 1]  # the primary also holds embeddings and head
    assert spread([1, 1, 1, 1, 1, 1], 3) == [0, 0, 1, 1, 2, 2]
    assert spread([5, 5], 4) == [0, 1]  # more devices than layers: one layer each
    assert spread([3, 3, 3], 1) == [0, 0, 0]
    assert spread([], 2) == []
    with pytest.raises(ValueError, match="parts must be at least 1"):
        spread([1], 0)


def _largest_run(sizes, runs, extra):
    totals = {}
    for s, r in zip(sizes, runs):
        totals[r] = totals.get(r, 0) + s
    totals[0] += extra
    return max(totals.values())


def test_spread_is_the_best_contiguous_cut():
    rng = random.Random(0)
    for _ in range(200):
        n, parts, extra = rng.randint(1, 8), rng.randint(1, 4), rng.choice([0, 0, 5, 20])
        sizes = [rng.randint(1, 20) for _ in range(n)]
        runs = spread(sizes, parts, extra)
        k = min(parts, n)
        assert runs[0] == 0 and runs[-1] == k - 1  # every run used, in order, none empty
        assert all(b - a in (0, 1) for a, b in zip(runs, runs[1:]))
        best = min(_largest_run(sizes, [sum(i >= c for c in cuts) for i in range(n)], extra)
                   for cuts in itertools.combinations(range(1, n), k - 1))
        assert _largest_run(sizes, runs, extra) == best


def test_plan_placement_names_each_layers_device():
    p = plan_placement([10, 10, 10, 10], 10, ["cpu", "cpu:0"])
    assert p.primary == CPU and p.layers == (CPU, OTHER, OTHER, OTHER)
    assert p.devices == [CPU, OTHER]


def test_device_lists_are_resolved_and_checked():
    with pytest.raises(TasaError, match="a list of devices names CUDA devices only"):
        Runtime(device="cuda:0,cpu")
    with pytest.raises(TasaError, match="cuda,cuda:0: a device is named twice"):
        Runtime(device="cuda,cuda:0")
    if not torch.cuda.is_available():
        with pytest.raises(TasaError, match=r"--device cuda:0: this machine has 0 CUDA device\(s\)"):
            Runtime(device="cuda:0,cuda:1")
    assert Runtime(device="cpu").devices == ["cpu"] and Runtime(device="cpu").primary == "cpu"
    with pytest.raises(TasaError, match="--batch-size must be a positive integer, got 0"):  # Runtime's other checks
        Runtime(batch_size=0)


def _save(model, path):
    model.save_pretrained(path, max_shard_size="20KB")
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def moves(monkeypatch):
    """Every move the placement hooks make: (device, what), what being the top-level type moved."""
    seen = []
    real = placement_module.send_to_device

    def spy(obj, device, **kwargs):
        seen.append((torch.device(device), type(obj).__name__))
        return real(obj, device, **kwargs)

    monkeypatch.setattr(placement_module, "send_to_device", spy)
    return seen


@pytest.mark.parametrize("stream", [False, True])
def test_a_spread_model_moves_each_off_primary_layers_inputs_in_and_outputs_back(tmp_path, moves, stream):
    path = _save(tiny_llama(layers=4), tmp_path / "m")
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load(str(path)).model(input_ids=ids).logits
        lm = load(str(path), device="cpu,cpu:0", stream=stream)
        arch = resolve(lm.model)
        assert arch.placement.layers == (CPU, CPU, OTHER, OTHER)  # embeddings and head count on the primary
        assert [arch.layer_device(i, CPU) for i in range(4)] == [CPU, CPU, OTHER, OTHER]
        assert compute_device(lm.model) == CPU
        moves.clear()
        got = lm.model(input_ids=ids).logits
    assert torch.equal(want, got)
    # layers 2 and 3: (args, kwargs) in to cpu:0, the output back to cpu; layers 0 and 1 move nothing
    assert moves == [(OTHER, "tuple"), (OTHER, "dict"), (CPU, "Tensor")] * 2
    if stream:
        streamer = streamer_of(lm.model)
        assert [u.device for u in streamer.layers] == [CPU, CPU, OTHER, OTHER]
        reads = []
        real = streamer.weights.get
        streamer.weights.get = lambda key, **kw: reads.append((key, kw["device"])) or real(key, **kw)
        from tasa.models.walker import walk

        for index, _layer in walk(arch, CPU):
            pass
        assert streamer.device == CPU  # fetching a layer onto its own device leaves the primary where it was
        layer_reads = {(k.split(".")[2], d) for k, d in reads if k.startswith("model.layers.")}
        assert layer_reads == {("0", CPU), ("1", CPU), ("2", OTHER), ("3", OTHER)}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("spec", [QuantizeSpec(method="gptq", bits=4, group_size=32),
                                  QuantizeSpec(method="gptq", bits=3, group_size=32, learn_rounding=3,
                                               learn_start="gptq", learn_output_kl=True)],
                         ids=["gptq", "learned"])
def test_quantizing_a_spread_model_writes_the_one_device_checkpoint(tmp_path, data_dir, moves, stream, spec):
    path = _save(tiny_llama(layers=3), tmp_path / "m")
    calib = CalibSpec.parse("wikitext2", nsamples=4, seqlen=32)
    one = quantize(str(path), tmp_path / "one", spec, calib, runtime=Runtime(progress=False))
    spread_model = load(str(path), device="cpu,cpu:0", stream=stream)
    assert resolve(spread_model.model).placement.layers == (CPU, OTHER, OTHER)
    moves.clear()
    two = quantize(spread_model, tmp_path / "two", spec, calib, runtime=Runtime(progress=False))
    assert {d for d, _ in moves} == {CPU, OTHER}  # the layers on cpu:0 computed through the hooks
    a, b = ((r.output_dir / "model.safetensors").read_bytes() for r in (one, two))
    assert a == b
    errors = [{n: m["rel_error"] for n, m in r.record["modules"].items()} for r in (one, two)]
    assert errors[0] == errors[1]


@pytest.mark.parametrize("stream", [False, True])
def test_a_spread_models_scores_generations_and_profile_equal_one_devices(tmp_path, data_dir, moves, stream):
    from tasa import pipeline
    from tasa.config import ProfileSpec
    from tasa.eval.lm import greedy_generate, loglikelihoods

    path = _save(tiny_llama(layers=3), tmp_path / "m")
    one, two = load(str(path), stream=stream), load(str(path), device="cpu,cpu:0", stream=stream)
    requests = [("the cat sat on", " a mat"), ("the cat sat on", " seven"), ("rivers and", " mountains")]
    contexts = ["the cat sat", "questions about apples and"]
    moves.clear()
    outs = [(loglikelihoods(lm.model, lm.tokenizer, requests, batch_size=2, progress=False),
             greedy_generate(lm.model, lm.tokenizer, contexts, until=["\n"], max_new_tokens=6, progress=False))
            for lm in (one, two)]
    assert {d for d, _ in moves} == {CPU, OTHER}
    assert [r.logprob for r in outs[0][0]] == [r.logprob for r in outs[1][0]]  # prefix-shared, KV-cached scoring
    assert outs[0][1] == outs[1][1]  # generation with a KV cache whose layers live on their own devices
    for estimator in ("measured", "fisher", "autoscheme"):  # probes; gradients through the hooks
        spec = ProfileSpec(objectives=("wikitext2", "arc_easy"), bits=(2, 4), group_size=16, probe_tokens=40,
                           probe_seqlen=32, estimator=estimator)
        costs = [{(o, b): c["cost"] for o, by_bits in rec.items() for b, c in by_bits.items()}
                 for rec in (pipeline.profile(lm, tmp_path / f"{estimator}-{i}", spec, Runtime(progress=False),
                                              report=False).record["costs"] for i, lm in enumerate((one, two)))]
        assert len(costs[0]) == 4 and costs[0] == costs[1], estimator


@pytest.mark.parametrize("stream", [False, True])
def test_a_spread_models_mixture_criteria_equal_one_devices(tmp_path, data_dir, moves, stream):
    from tasa import pipeline
    from tasa.config import MixtureSpec

    path = _save(tiny_llama(layers=3), tmp_path / "m")
    spec = MixtureSpec(general="wikitext2", tasks=("gsm8k",), ratios=(0.0, 0.5, 1.0),
                       criteria=("hessian-trace", "grad-align"), nsamples=4, seqlen=32, heldout_samples=2,
                       sketch_dim=256, group_size=16)
    records = []
    for i, lm in enumerate((load(str(path), stream=stream), load(str(path), device="cpu,cpu:0", stream=stream))):
        moves.clear()
        records.append(pipeline.search_mixture(lm, tmp_path / f"s{i}", spec, Runtime(progress=False),
                                               report=False).record)
    assert {d for d, _ in moves} == {CPU, OTHER}
    for criterion in ("hessian-trace", "grad-align"):
        assert records[0]["results"][criterion]["values"] == records[1]["results"][criterion]["values"]
