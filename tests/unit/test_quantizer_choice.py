"""tasa run --time-budget: the quantizer chosen by a trial of its first decoder layer (tasa.pipeline.quantizer_choice),
the projection and the choice exactly on small cases, and end to end on the tiny model: the trial leaves the model as
it was (the checkpoint equals one made without a trial, bit for bit), and what was chosen is recorded and reported."""
from __future__ import annotations

import json

import pytest

from tasa.cancel import Overtime, cancel_point, deadline
from tasa.pipeline.quantizer_choice import Candidate, choose, head_factor, projected_seconds
from tests.unit.test_cli import _small_run, run_cli


def test_projection_counts_every_layer_as_the_first_and_the_last_by_its_factor():
    assert projected_seconds(2.0, 30) == 60.0
    assert projected_seconds(2.0, 30, 4.0) == 2.0 * 29 + 8.0
    assert projected_seconds(5.0, 1, 3.0) == 15.0  # one layer: the first is the last
    assert head_factor(3_540_000, 28_311_552) == pytest.approx(1 + 28_311_552 / 3_540_000)
    assert head_factor(10, 0) == 1.0
    for bad in ((-1.0, 30), (1.0, 0), (1.0, 3, 0.5)):
        with pytest.raises(ValueError):
            projected_seconds(*bad)
    with pytest.raises(ValueError):
        head_factor(0, 5)


def _trials(seconds: dict[str, float]):
    """A fake trial: each candidate's first layer takes ``seconds[name]``, stopped at the deadline."""
    ran = []

    def trial(c: Candidate, deadline: float) -> tuple[float, bool]:
        ran.append((c.name, deadline))
        return (seconds[c.name], True) if seconds[c.name] <= deadline else (deadline, False)
    return trial, ran


def test_the_best_candidate_whose_projection_fits_what_is_left_after_its_trial_is_chosen():
    best, good, default = Candidate("best", "B", 2.0), Candidate("good", "G"), Candidate("default", "D")
    # best: 10 s a layer, 4 layers with the last twice -> 50 s; good: 3 s a layer -> 12 s
    trial, ran = _trials({"best": 10.0, "good": 3.0})
    c = choose([best, good, default], 60.0, 4, trial)  # 60 - 10 = 50 left after best's trial: 50 fits, exactly
    assert (c.candidate, ran) == (best, [("best", 10.0)])  # deadline 60 / (4 + 2)
    assert c.trials == [{"name": "best", "deadline_seconds": 10.0, "trial_seconds": 10.0, "first_layer_seconds": 10.0,
                         "projected_seconds": 50.0, "seconds_left": 50.0, "fits": True}]
    assert c.describe() == ("best (60 s of the budget left for quantizing; trial of best: its first layer took "
                            "10.0 s, projecting 50 s against 50 s left (fits))")
    trial, ran = _trials({"best": 10.0, "good": 3.0})
    c = choose([best, good, default], 54.0, 4, trial)  # best stopped at 9 s; good: deadline 45 / 5 = 9 >= 3
    assert (c.candidate, ran) == (good, [("best", 9.0), ("good", 9.0)])
    assert c.trials[0] == {"name": "best", "deadline_seconds": 9.0, "trial_seconds": 9.0, "first_layer_seconds": None,
                           "projected_seconds": None, "seconds_left": 45.0, "fits": False}
    assert c.trials[1]["fits"] and c.trials[1]["seconds_left"] == 42.0 and c.trials[1]["projected_seconds"] == 12.0
    assert "trial of best: its first layer stopped at the deadline of 9.0 s, past which its projection could not " \
        "fit; trial of good: its first layer took 3.0 s, projecting 12 s against 42 s left (fits)" in c.describe()
    trial, ran = _trials({"best": 10.0, "good": 3.0})
    c = choose([best, good, default], 17.0, 4, trial)  # neither fits: the default, never tried
    assert (c.candidate, [n for n, _ in ran]) == (default, ["best", "good"])
    assert [t["first_layer_seconds"] for t in c.trials] == [None, None]  # stopped at 17 / 6, then at that / 5
    assert c.trials[1]["seconds_left"] == pytest.approx(17 - 17 / 6 - (17 - 17 / 6) / 5)
    trial, ran = _trials({"best": 10.0, "good": 3.0})
    c = choose([best, good, default], 0.0, 4, trial)  # the budget is spent: no trial at all
    assert (c.candidate, ran, c.trials) == (default, [], [])
    assert c.describe() == "default (the budget already spent before quantizing)"
    assert choose([default], 100.0, 4, trial).candidate == default
    with pytest.raises(ValueError):
        choose([], 100.0, 4, trial)


def test_a_deadline_stops_the_block_at_the_first_cancel_point_past_it_in_its_own_thread_only():
    import threading
    import time

    cancel_point()  # no deadline: nothing happens
    with deadline(0.05):
        cancel_point()  # before it: nothing
        time.sleep(0.06)  # no cancel point: runs on
        with pytest.raises(Overtime):
            cancel_point()
        with pytest.raises(Overtime):
            cancel_point()  # and at every one after
        seen = []
        thread = threading.Thread(target=lambda: (cancel_point(), seen.append("ran")))
        thread.start()
        thread.join()
        assert seen == ["ran"]  # another thread is not under it
        with deadline(10):  # an inner deadline governs its block, the outer one again after it
            cancel_point()
        with pytest.raises(Overtime):
            cancel_point()
    cancel_point()  # gone after the block
    assert not issubclass(Overtime, Exception)  # `except Exception` handlers let it through


def _checkpoint(out_dir, model: str = "model") -> dict[str, bytes]:
    checkpoint = {f.name: f.read_bytes() for f in sorted((out_dir / model).glob("*.safetensors"))}
    assert checkpoint
    return checkpoint


def test_run_chooses_its_quantizer_by_a_trial_that_leaves_the_model_as_it_was(tiny_model_dir, tmp_path, capsys,
                                                                             data_dir, monkeypatch):
    import importlib

    import tasa.cancel
    import tasa.pipeline.quantizer_choice as qc
    from tasa.config import BETTER_QUANTIZER

    run_module = importlib.import_module("tasa.pipeline.run")  # the package's `run` is the function
    out_dir = tmp_path / "run"
    args = _small_run(tiny_model_dir, out_dir)
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    default = _checkpoint(out_dir)
    default_name = json.loads((out_dir / "run.json").read_text())["quantizer"]
    assert default_name.startswith("gptq with") and "quantizer_choice" not in json.loads(
        (out_dir / "run.json").read_text())
    code, out, err = run_cli(args + BETTER_QUANTIZER[0].split(), capsys)
    assert code == 0, err
    better = _checkpoint(out_dir)
    better_name = json.loads((out_dir / "run.json").read_text())["quantizer"]
    assert better_name.startswith("learned rounding (128 steps per layer) from GPTQ") and better != default

    # a budget the better quantizer fits: it is tried on the first layer, chosen, and makes the same checkpoint
    code, out, err = run_cli(args + ["--time-budget", "100000"], capsys)
    assert code == 0 and "stages run: quantize, eval_quant" in out, out + err
    run = json.loads((out_dir / "run.json").read_text())
    assert run["quantizer"] == better_name and run["time_budget"] == 100000
    choice = run["quantizer_choice"]
    assert choice["chosen"] == better_name and [t["name"] for t in choice["trials"]] == [better_name]
    assert choice["trials"][0]["fits"] and 0 < choice["trials"][0]["first_layer_seconds"] < run["seconds"]["quantize"]
    assert _checkpoint(out_dir) == better
    report = (out_dir / "report.md").read_text()
    assert f"made by {better_name}" in report and "time budget of 100000 minutes" in report
    assert choice["describe"] in report

    # one it does not fit (its projection made too long): the default, after the trial, bit for bit as without it;
    # and one stopped at its deadline, wherever it lands in the trial
    for stream, minutes, stopped in (("off", "50000", False), ("on", "40000", False), ("off", "30000", True),
                                     ("on", "20000", True)):  # in memory put back; streamed read again
        with monkeypatch.context() as m:
            if stopped:
                m.setattr(run_module, "deadline", lambda seconds: tasa.cancel.deadline(0.05))
            else:
                m.setattr(qc, "projected_seconds", lambda *a: float("inf"))
            code, out, err = run_cli(args + ["--time-budget", minutes, "--stream", stream], capsys)
        assert code == 0 and "stages run: quantize, eval_quant" in out, out + err
        run = json.loads((out_dir / "run.json").read_text())
        trial = run["quantizer_choice"]["trials"][0]
        assert run["quantizer"] == default_name and trial["fits"] is False
        assert (trial["first_layer_seconds"] is None) is stopped
        assert _checkpoint(out_dir) == default, (stream, stopped)
        assert not list(out_dir.glob(".*tmp*")) and not list(out_dir.glob("*tmp*"))  # no trial left behind
    # a budget the earlier stages already spent: the default, with no trial
    code, out, err = run_cli(args + ["--time-budget", "0.000001"], capsys)
    assert code == 0, err
    run = json.loads((out_dir / "run.json").read_text())
    assert run["quantizer"] == default_name and run["quantizer_choice"]["trials"] == []
    assert "the budget already spent before quantizing" in (out_dir / "report.md").read_text()
    assert _checkpoint(out_dir) == default

    for bad, message in ((["--time-budget", "0"], "--time-budget takes a positive number of minutes"),
                         (["--time-budget", "nan"], "--time-budget takes a positive number of minutes"),
                         (["--time-budget", "5", "--learn-rounding", "8"], "give it or --learn-rounding, not both")):
        code, _, err = run_cli(args + bad, capsys)
        assert code == 2 and message in err, err


def test_the_better_quantizers_flags_and_fields_agree():
    from tasa.cli import build_parser
    from tasa.config import BETTER_BF16_BATCH, BETTER_OPTIONS, BETTER_QUANTIZER, BETTER_QUANTIZER_BF16

    args = build_parser().parse_args(["quantize", "--model", "m", "--output-dir", "o", *BETTER_QUANTIZER[0].split()])
    assert {k: getattr(args, k) for k in BETTER_OPTIONS} == BETTER_OPTIONS
    assert args.learn_rounding and not build_parser().parse_args(["quantize", "--model", "m", "--output-dir",
                                                                  "o"]).learn_rounding
    fast = build_parser().parse_args(["quantize", "--model", "m", "--output-dir", "o",
                                      *BETTER_QUANTIZER_BF16[0].split()])  # what tasa run --time-budget tries
    assert {k: getattr(fast, k) for k in BETTER_OPTIONS} == BETTER_OPTIONS
    assert (fast.batch_size, fast.dtype) == (BETTER_BF16_BATCH, "bfloat16")


def test_run_tries_the_bfloat16_variant_on_a_cpu_that_computes_it_and_reloads_the_model_if_not_chosen(
        tiny_model_dir, tmp_path, capsys, data_dir, monkeypatch):
    import importlib

    import tasa.cancel
    from tasa.config import BETTER_QUANTIZER_BF16

    run_module = importlib.import_module("tasa.pipeline.run")
    monkeypatch.setattr(run_module, "native_bfloat16", lambda device: True)  # as on such a CPU, anywhere
    out_dir = tmp_path / "run"
    args = _small_run(tiny_model_dir, out_dir)
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    default = _checkpoint(out_dir)
    q_dir = tmp_path / "q-bf16"  # the variant by tasa quantize on the run's plan and calibration
    code, out, err = run_cli(["quantize", "--model", str(tiny_model_dir), "--plan", str(out_dir / "plan.json"),
                              "--calib", "wikitext2:0.5,gsm8k:0.5", "--nsamples", "4", "--seqlen", "32",
                              *BETTER_QUANTIZER_BF16[0].split(), "--output-dir", str(q_dir), "--quiet"], capsys)
    assert code == 0, err
    variant = _checkpoint(q_dir, ".")

    def stopping(first_n: int):
        """deadline(): the first ``first_n`` trials stopped at once, the later ones as asked."""
        calls = []

        def fake(seconds):
            calls.append(seconds)
            return tasa.cancel.deadline(0.0 if len(calls) <= first_n else seconds)
        return fake

    with monkeypatch.context() as m:  # the float32 one stopped, the bfloat16 one fits: chosen
        m.setattr(run_module, "deadline", stopping(1))
        code, out, err = run_cli(args + ["--time-budget", "100000"], capsys)
    assert code == 0, err
    run = json.loads((out_dir / "run.json").read_text())
    choice = run["quantizer_choice"]
    assert [t["fits"] for t in choice["trials"]] == [False, True]
    assert choice["chosen"].endswith(", the model in bfloat16, 2-sequence batches")
    assert run["quantize_dtype"] == "bfloat16" and run["dtype"] == "float32"
    assert _checkpoint(out_dir) == variant  # as tasa quantize makes it
    assert "the model in bfloat16 while quantized" in (out_dir / "report.md").read_text()
    assert json.loads((out_dir / "eval-quant.json").read_text())["results"]["wikitext2"]["kl"] > 0

    with monkeypatch.context() as m:  # both stopped: the default, on the model loaded again in float32
        m.setattr(run_module, "deadline", stopping(2))
        code, out, err = run_cli(args + ["--time-budget", "90000"], capsys)
    assert code == 0, err
    run = json.loads((out_dir / "run.json").read_text())
    assert [t["fits"] for t in run["quantizer_choice"]["trials"]] == [False, False]
    assert run["quantize_dtype"] == "float32" and _checkpoint(out_dir) == default
