"""Probes on a local Ray cluster (2 CPU workers) against the serial path, with a tiny random model on disk:
the same probes and plan, a worker killed by its PID mid-profile changes nothing, clear errors on bad input."""
import dataclasses
import functools
import json
import os
import signal
import sys

import pytest
import torch

from tasa.config import Cluster, ProfileSpec, Runtime
from tasa.errors import TasaError
from tasa.models.arch import resolve
from tasa.profile.objectives import build_objective
from tasa.profile.probe import ProbeStore, run_probes
from tests.conftest import byte_tokenizer, tiny_llama, write_tiny_data


def _ray():
    try:
        import ray
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("Ray is not installed (the test extra installs it); CI does not skip the distributed tests")
        pytest.skip("Ray is not installed: pip install 'tasa[distributed]'")
    return ray


@pytest.fixture(scope="module")
def cluster():
    ray = _ray()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield Cluster("ray", workers=2, threads=1)
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llama(layers=3).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_tiny_data(tmp_path_factory.mktemp("data") / "data")


def _source(model_dir):
    from tasa.distributed.cluster import ModelSource

    return ModelSource(str(model_dir), "float32", gpu=False, stream=False, tie_experts=True)


def _killing(base, after: int, worker: int, seen: dict):
    """``base`` (a Ray probe runner) whose ``worker``-th actor is SIGKILLed right after the ``after``-th probe is
    submitted; ``seen`` records the killed pid ("killed") and, at close, the pool's pids ("after")."""

    class Killing(base):
        def submit(self, job):
            super().submit(job)
            seen["submitted"] = seen.get("submitted", 0) + 1
            if seen["submitted"] == after:
                seen["killed"] = self.pool.pids[worker]
                os.kill(self.pool.pids[worker], signal.SIGKILL)

        def close(self):
            seen["after"] = self.pool.call_all("pid")
            super().close()

    return Killing


def test_distributed_profile_equals_serial(cluster, model_dir, tiny_data, tmp_path, monkeypatch):
    from tasa import pipeline
    from tasa.config import AllocationSpec

    monkeypatch.setenv("TASA_DATA_DIR", str(tiny_data))
    spec = ProfileSpec(objectives=("wikitext2", "arc_easy"), bits=(2, 4), granularity="module", group_size=16,
                       probe_tokens=60, probe_seqlen=32)
    serial = pipeline.profile(str(model_dir), tmp_path / "serial", spec, Runtime(progress=False), report=False)
    ray_run = pipeline.profile(str(model_dir), tmp_path / "ray", spec, Runtime(progress=False, cluster=cluster),
                               report=False)
    s, r = serial.record, ray_run.record
    assert r["placement"]["backend"] == "ray" and r["placement"]["workers"] == 2 and r["placement"]["nodes"] == 1
    assert s["placement"]["backend"] == "serial"
    assert [u["name"] for u in s["units"]] == [u["name"] for u in r["units"]] and len(s["units"]) == 21
    for o in s["costs"]:
        for b in s["costs"][o]:
            # float32 on 1 thread in a worker against the test's threads: equal to float tolerance (bitwise here)
            torch.testing.assert_close(torch.tensor(r["costs"][o][b]["cost"]), torch.tensor(s["costs"][o][b]["cost"]),
                                       rtol=1e-5, atol=1e-9)
    assert sorted(p.name for p in (tmp_path / "ray" / "probes").iterdir()) == \
        sorted(p.name for p in (tmp_path / "serial" / "probes").iterdir())
    for d in ("serial", "ray"):
        pipeline.allocate_bits(tmp_path / d, tmp_path / f"{d}-plan.json", AllocationSpec(budget=3.0))
    plans = [json.loads((tmp_path / f"{d}-plan.json").read_text())["modules"] for d in ("serial", "ray")]
    assert plans[0] == plans[1] and {m["bits"] for m in plans[0].values()} == {2, 4}  # a mixed plan, the same


def test_worker_killed_mid_profile_changes_nothing(cluster, model_dir, tiny_data, tmp_path, monkeypatch):
    """GPTQ probes (each layer's Hessians travel with its inputs); one worker SIGKILLed after the 3rd probe is
    submitted: Ray restarts it and retries its probes, and every probe equals the serial one."""
    from tasa.distributed.probes import RayProbes

    monkeypatch.setenv("TASA_DATA_DIR", str(tiny_data))
    from tasa.models import load

    lm = load(str(model_dir))
    arch = resolve(lm.model)
    objs = [build_objective("wikitext2", lm.tokenizer, min_tokens=60, seqlen=32)]
    spec = ProfileSpec(objectives=("wikitext2",), bits=(2, 3, 4), granularity="module", group_size=16,
                       probe_tokens=60, probe_seqlen=32)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    serial = run_probes(lm.model, arch, objs, spec, calib_ids=calib, progress=False)
    seen: dict = {}
    Killing = _killing(RayProbes, after=3, worker=0, seen=seen)
    store = ProbeStore(tmp_path, {"test": 1})
    runner = functools.partial(Killing, cluster=cluster, model=_source(model_dir))
    res = run_probes(lm.model, arch, objs, spec, store=store, calib_ids=calib, progress=False, runner=runner)
    assert seen["killed"] not in seen["after"] and len(seen["after"]) == 2  # restarted, not lost
    assert res.probes.keys() == serial.probes.keys() and len(res.probes) == 63
    assert len(list((tmp_path / "probes").glob("*.json"))) == 63
    # float32 sums in another order (1 thread in a worker, the test's threads here; Hessians and GPTQ too): a
    # token's KL is a difference of log-probs of magnitude ~5, so its error is a few float32 ulps of that, ~1e-6
    for k in serial.probes:
        for what in ("nll", "kl"):
            torch.testing.assert_close(getattr(res.probes[k]["wikitext2"], what),
                                       getattr(serial.probes[k]["wikitext2"], what), rtol=1e-5, atol=2e-6)


def test_distributed_settings_are_checked(monkeypatch, capsys):
    from tasa.cli import main

    with pytest.raises(TasaError, match="--address, --workers, --placement and --stages need --distributed ray"):
        Cluster(None, workers=2)
    with pytest.raises(TasaError, match="--placement"):
        Cluster("ray", placement="ring")
    with pytest.raises(TasaError, match="--stages applies to --placement pipeline"):
        Cluster("ray", placement="task", stages=2)
    with pytest.raises(TasaError, match="--workers must be a positive integer"):
        Cluster("ray", workers=0)
    with pytest.raises(SystemExit) as exit_:
        main(["profile", "--workers", "2", "--output-dir", "unused"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == \
        "tasa: error: --address, --workers, --placement and --stages need --distributed ray"
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed: refused when the settings are made
    with pytest.raises(TasaError, match=r"pip install 'tasa\[distributed\]'"):
        Cluster("ray")
    from tasa.distributed.cluster import connect

    with pytest.raises(TasaError, match=r"pip install 'tasa\[distributed\]'"):
        connect(Cluster())


def test_more_workers_than_the_cluster_holds(cluster):
    import ray

    from tasa.distributed.cluster import worker_count

    assert worker_count(ray, Cluster("ray"), gpu=False) == 2
    assert worker_count(ray, Cluster("ray", threads=2), gpu=False) == 1
    with pytest.raises(TasaError, match="--workers 3: the Ray cluster holds 2 worker"):
        worker_count(ray, Cluster("ray", workers=3), gpu=False)
    with pytest.raises(TasaError, match="no GPU"):
        worker_count(ray, Cluster("ray"), gpu=True)


def test_pipeline_placement_gives_the_task_placements_probes(cluster, model_dir, tiny_data, tmp_path, monkeypatch):
    """Two stages holding layers [0, 2) and [2, 3) of a streamed model: probes of layers 0 and 1 start on the
    first and flow through the second, those of layer 2 start on the last; the same probes as serially, with two
    pipelines of one stage, and with the last stage killed mid-profile (restarted by Ray, its calls retried)."""
    from tasa.distributed.pipeline import RayPipeline
    from tasa.distributed.cluster import ModelSource
    from tasa.models import load

    monkeypatch.setenv("TASA_DATA_DIR", str(tiny_data))
    lm = load(str(model_dir))
    arch = resolve(lm.model)
    objs = [build_objective(name, lm.tokenizer, min_tokens=60, seqlen=32) for name in ("wikitext2", "arc_easy")]
    spec = ProfileSpec(objectives=("wikitext2", "arc_easy"), bits=(2, 4), granularity="module", group_size=16,
                       probe_tokens=60, probe_seqlen=32)
    serial = run_probes(lm.model, arch, objs, spec, progress=False)
    source = ModelSource(str(model_dir), "float32", gpu=False, stream=True, tie_experts=True)
    res = run_probes(lm.model, arch, objs, spec, progress=False,
                     runner=functools.partial(RayPipeline, cluster=cluster, model=source))
    assert res.placement["placement"] == "pipeline" and res.placement["slices"] == [[0, 2], [2, 3]]
    assert res.placement["pipelines"] == 1
    two = run_probes(lm.model, arch, objs, spec, progress=False,  # two pipelines of one stage
                     runner=functools.partial(RayPipeline, cluster=dataclasses.replace(cluster, stages=1),
                                              model=source))
    assert two.placement["slices"] == [[0, 3]] and two.placement["pipelines"] == 2
    for k in serial.probes:
        torch.testing.assert_close(two.probes[k]["arc_easy"].choice_logp, res.probes[k]["arc_easy"].choice_logp,
                                   rtol=1e-5, atol=2e-6)
    seen: dict = {}
    # the last stage SIGKILLed after the 5th probe is submitted: restarted, retried
    Killing = _killing(RayPipeline, after=5, worker=1, seen=seen)

    killed = run_probes(lm.model, arch, objs, spec, progress=False,
                        runner=functools.partial(Killing, cluster=cluster, model=source))
    assert seen["killed"] not in seen["after"] and len(seen["after"]) == 2
    for k in serial.probes:
        torch.testing.assert_close(killed.probes[k]["wikitext2"].kl, res.probes[k]["wikitext2"].kl, rtol=0, atol=0)
    assert res.probes.keys() == serial.probes.keys() and len(res.probes) == 42
    for o in ("wikitext2", "arc_easy"):
        torch.testing.assert_close(res.base[o].nll, serial.base[o].nll, rtol=1e-5, atol=2e-6)
        for k in serial.probes:
            for what in ("nll", "kl", "choice_logp"):
                got, want = getattr(res.probes[k][o], what), getattr(serial.probes[k][o], what)
                assert (got is None) == (want is None)
                if want is not None:
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


def test_data_parallel_hessians_equal_the_single_worker_ones(cluster, model_dir):
    """GPTQ's calibration on 2 Ray workers (a shard of 3 and of 2 sequences): each layer's merged Hessians equal
    those of all 5 sequences in one process, and the quantized model matches the single-process one."""
    from tasa.distributed.calibration import RayCalibration
    from tasa.distributed.cluster import ModelSource
    from tasa.models import load
    from tasa.config import QuantSpec
    from tasa.plan import Plan
    from tasa.quant.apply import Calibration, quantize_model

    calib = torch.randint(0, 256, (5, 32), generator=torch.Generator().manual_seed(1))
    lm = load(str(model_dir))
    arch = resolve(lm.model)
    local = Calibration(lm.model, arch, calib, 2, torch.device("cpu"))
    spread = RayCalibration(cluster, ModelSource(str(model_dir), "float32", False, False, True), calib, 2)
    try:
        assert spread.n == 2
        layer = arch.layers[0]
        locals_ = [m.local for m in arch.layer_modules(0)]
        groups = local.groups(layer, locals_)
        assert spread.groups(layer, locals_) == groups and len(groups) == 4  # qkv, o, gate/up, down
        firsts = [g[0] for g in groups]
        c_local, c_spread = {}, {}
        h_local, h_spread = local.hessians(layer, firsts, c_local), spread.hessians(layer, firsts, c_spread)
        assert c_local == c_spread == {f: 5 * 32 for f in firsts}
        for f in firsts:
            torch.testing.assert_close(h_spread[f], h_local[f], rtol=1e-5, atol=1e-6)
    finally:
        spread.close()
        local.close()
    plan = Plan.uniform([m.name for m in arch.modules], QuantSpec(bits=3, group_size=16))
    serial_model = load(str(model_dir)).model
    serial = quantize_model(serial_model, resolve(serial_model), plan, calib, batch_size=2, progress=False)
    dp_model = load(str(model_dir)).model
    dp = quantize_model(dp_model, resolve(dp_model), plan,
                        RayCalibration(cluster, ModelSource(str(model_dir), "float32", False, False, True), calib, 2),
                        batch_size=2, progress=False)
    # GPTQ feeds each rounding's error to the columns after it, so where a merged Hessian's last bits tip one
    # rounding (or the scale search's choice of a group's range) the rest of the row can follow, and the next
    # layers see other inputs: the same quality, not the same bits.  How far it spreads depends on the CPU's
    # summation order (an AMD EPYC kept 98.9% of the weights identical, an Intel Xeon 26% to 100%); the
    # errors stay close (measured: every module within 1.8%).  The first layer's first inputs are the same in both
    # runs, their Hessians equal up to float32 summation order: the same codes, and each group's fp16 scale (taken
    # from columns GPTQ has already updated, which carry the Hessian's last bits) at most one fp16 step apart where
    # it sits on an fp16 rounding boundary (1-2 groups of q_proj's 256 on the AMD EPYC of 2026-12-07; bit-equal on
    # the CPUs before), so every weight (q - z) * s within 2^-10 of itself; a code rounded the other way would be a
    # whole grid step off.
    weights = dict(serial_model.named_parameters()), dict(dp_model.named_parameters())
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"):
        a, b = weights[0][name + ".weight"], weights[1][name + ".weight"]
        assert torch.all((a - b).abs() <= a.abs() * 2**-10)
    for name, stats in serial.modules.items():
        assert dp.modules[name].rel_error == pytest.approx(stats.rel_error, rel=0.05)
    total = sum(s.rel_error for s in serial.modules.values())
    assert sum(s.rel_error for s in dp.modules.values()) == pytest.approx(total, rel=0.01)


def test_quantize_verb_spreads_gptq_calibration(cluster, model_dir, tiny_data, tmp_path, monkeypatch):
    """`tasa quantize --distributed ray`: one worker holding the whole calibration, on one thread as here, makes
    the serial checkpoint exactly; two workers (2 shards) one of the same quality (GPTQ and the scale search
    carry a merged Hessian's last bits into other roundings: measured here, per-module errors within 10% either
    way, their sum within 1%); the record says how many workers; pipeline placement is refused for it."""
    from tasa import pipeline
    from tasa.config import CalibSpec, QuantizeSpec

    monkeypatch.setenv("TASA_DATA_DIR", str(tiny_data))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # data-parallel calibration holds no float stream, so the serial run's default asymmetric calibration
        # is turned off to compare like with like
        spec, calib = QuantizeSpec(bits=3, group_size=16, float_targets=0.0), CalibSpec(nsamples=16, seqlen=64)
        serial = pipeline.quantize(str(model_dir), tmp_path / "serial", spec, calib,
                                   runtime=Runtime(progress=False, batch_size=16)).record
        one = pipeline.quantize(str(model_dir), tmp_path / "one", spec, calib,
                                runtime=Runtime(progress=False, batch_size=16,
                                                cluster=dataclasses.replace(cluster, workers=1))).record
        two = pipeline.quantize(str(model_dir), tmp_path / "two", spec, calib,
                                runtime=Runtime(progress=False, batch_size=8, cluster=cluster)).record
    finally:
        torch.set_num_threads(threads)
    assert (one["calibration_workers"], two["calibration_workers"]) == (1, 2)
    assert "calibration_workers" not in serial and one["calib_sha256"] == two["calib_sha256"] == serial["calib_sha256"]
    errors = {k: [r["modules"][n]["rel_error"] for n in serial["modules"]] for k, r in
              (("serial", serial), ("one", one), ("two", two))}
    assert errors["one"] == errors["serial"]
    assert errors["two"][:7] == pytest.approx(errors["serial"][:7], rel=1e-3)  # layer 0: the same inputs
    assert sum(errors["two"]) == pytest.approx(sum(errors["serial"]), rel=0.02)
    with pytest.raises(TasaError, match="--placement pipeline applies to profiling only"):
        pipeline.quantize(str(model_dir), tmp_path / "pipe", spec, calib,
                          runtime=Runtime(progress=False, cluster=dataclasses.replace(cluster, placement="pipeline")))


def test_measured_mixture_points_on_ray_equal_serial(cluster, model_dir, tiny_data, tmp_path, monkeypatch):
    """`tasa search-mixture --criterion measured --distributed ray`: every grid point a Ray task; on one thread
    each, as here, the same held-out NLLs as the serial search, and the points stored for a resumed search."""
    from tasa import pipeline
    from tasa.config import MixtureSpec

    monkeypatch.setenv("TASA_DATA_DIR", str(tiny_data))
    spec = MixtureSpec(general="wikitext2", tasks=("gsm8k",), ratios=(0.0, 0.5, 1.0), criteria=("measured",),
                       nsamples=4, seqlen=32, heldout_samples=2, group_size=16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = pipeline.search_mixture(str(model_dir), tmp_path / "serial", spec, Runtime(progress=False),
                                         report=False).record
        spread = pipeline.search_mixture(str(model_dir), tmp_path / "ray", spec,
                                         Runtime(progress=False, cluster=cluster), report=False).record
    finally:
        torch.set_num_threads(threads)
    assert spread["results"]["measured"]["values"] == serial["results"]["measured"]["values"]
    assert spread["chosen"] == serial["chosen"] and len(list((tmp_path / "ray" / "measured").glob("*.json"))) == 3


def test_calibration_worker_killed_mid_quantize_changes_nothing(cluster, model_dir):
    """A calibration worker SIGKILLed by its PID in layer 1 of 3: a new one replays its shard through layer 0's
    quantized weights and the run goes on; the quantized model equals an uninterrupted run's bit for bit."""
    from tasa.config import QuantSpec
    from tasa.distributed.calibration import RayCalibration
    from tasa.models import load
    from tasa.plan import Plan
    from tasa.quant.apply import quantize_model

    calib = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(2))
    source = _source(model_dir)
    seen: dict = {"hessians": 0}

    class Killing(RayCalibration):
        def hessians(self, layer, firsts, counts):
            seen["hessians"] += 1
            if seen["hessians"] == 6:  # layer 1's second step (each layer: q/k/v, o, gate/up, down)
                seen["killed"] = self.pids[1]
                os.kill(self.pids[1], signal.SIGKILL)
            return super().hessians(layer, firsts, counts)

        def close(self):
            seen["replaced"] = self.replaced
            super().close()

    models = []
    for cls in (RayCalibration, Killing):
        lm = load(str(model_dir))
        arch = resolve(lm.model)
        plan = Plan.uniform([m.name for m in arch.modules], QuantSpec(bits=3, group_size=16))
        quantize_model(lm.model, arch, plan, cls(cluster, source, calib, 2), batch_size=2, progress=False)
        models.append(lm.model)
    assert seen["replaced"] == 1 and seen["hessians"] == 12
    for (name, a), (_, b) in zip(models[0].state_dict().items(), models[1].state_dict().items()):
        assert torch.equal(a, b), name


def test_sweep_plans_on_ray_equal_serial(cluster, model_dir, tiny_data, tmp_path, monkeypatch):
    """`tasa sweep --distributed ray`: every plan a Ray task; on one thread each, as here, the same results."""
    from tasa import pipeline
    from tasa.config import CalibSpec, EvalSpec, QuantizeSpec, SweepSpec

    monkeypatch.setenv("TASA_DATA_DIR", str(tiny_data))
    spec = ProfileSpec(objectives=("wikitext2",), bits=(2, 4), group_size=16, probe_tokens=60, probe_seqlen=32)
    pipeline.profile(str(model_dir), tmp_path / "profile", spec, Runtime(progress=False), report=False)
    sweep = SweepSpec(budgets=(2.5, 3.5), betas=(1.0,), calib=CalibSpec(nsamples=4, seqlen=32),
                      quantize=QuantizeSpec(scale_search=0),
                      evaluation=EvalSpec(tasks=("wikitext2",), windows=2, seqlen=32, generate=False))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = pipeline.sweep(str(model_dir), tmp_path / "profile", tmp_path / "serial", sweep,
                                Runtime(progress=False)).record
        spread = pipeline.sweep(str(model_dir), tmp_path / "profile", tmp_path / "ray", sweep,
                                Runtime(progress=False, cluster=cluster)).record
    finally:
        torch.set_num_threads(threads)
    assert spread["placement"] == "ray" and spread["measured_this_run"] == 2
    assert [r["results"]["wikitext2"]["ppl"] for r in spread["rows"]] == \
        [r["results"]["wikitext2"]["ppl"] for r in serial["rows"]]


def test_run_quantize_stage_takes_the_cluster_without_the_profiles_placement(cluster):
    from tasa.pipeline.run import quantize_runtime

    pipe = Runtime(cluster=dataclasses.replace(cluster, placement="pipeline", stages=1))
    q = quantize_runtime(pipe)
    assert (q.cluster.backend, q.cluster.workers, q.cluster.placement, q.cluster.stages) == ("ray", 2, "auto", None)
    assert quantize_runtime(Runtime()) == Runtime()
