from tasa.report.common import markdown_to_html, write_pages


def test_markdown_to_html_renders_lists_tables_images_and_escapes_html():
    md = ("# Plan\n\n- first\n- second\n\n| unit | bits |\n| --- | ---: |\n| layer.0 | 4 |\n\n"
          "![bits per layer](plan.png)\n\n<script>x</script> a < b\n")
    page = markdown_to_html(md, "t <1>")
    assert "<title>t &lt;1&gt;</title>" in page
    assert "<h1>Plan</h1>" in page
    assert "<ul>\n<li>first</li>\n<li>second</li>\n</ul>" in page  # list items inside a list
    assert "<thead>\n<tr>\n<th>unit</th>\n<th style=\"text-align:right\">bits</th>" in page
    assert "<td>layer.0</td>" in page
    assert '<img src="plan.png" alt="bits per layer" />' in page
    assert "<script>" not in page and "&lt;script&gt;x&lt;/script&gt; a &lt; b" in page


def test_pages_are_written_whole(tmp_path):
    path = write_pages(tmp_path, "# A\n", "A")
    assert path == tmp_path / "report.md" and path.read_text() == "# A\n"
    assert "<h1>A</h1>" in (tmp_path / "report.html").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.md"]  # no temporary files left


def test_run_report_names_a_mixed_calibration_for_learned_rounding_on_task_only_text():
    """The quantizer section: the better quantizer with its time estimate under the default; with learned rounding
    (used or named) on a calibration without the general text, the mixed calibration of the run's tasks."""
    from tasa.report.run_report import _quantizer

    default = "gptq with --act-order --static-groups --scale-search 16 --float-targets 0.25"
    hint = "`--calib wikitext2:0.75,gsm8k:0.125,arc_easy:0.125`"
    task_only = {"quantizer": default, "seconds": {"quantize": 100.0}, "calib": "gsm8k:0.5,arc_easy:0.5",
                 "tasks": ["gsm8k", "arc_easy"]}
    text = "\n".join(_quantizer(task_only))
    assert f"The checkpoint was made by {default} in 100 s." in text
    from tasa.config import BETTER_QUANTIZER

    ratio = BETTER_QUANTIZER[1]
    assert f"about {ratio:g}x this quantizer's time on a CPU, about {100 * ratio:.0f} s for this run" in text
    assert "With learned rounding, this calibration has no general text (wikitext2)." in text and hint in text

    learned = {**task_only, "quantizer": "learned rounding (128 steps per layer) from GPTQ"}
    text = "\n".join(_quantizer(learned))
    assert "leaves less error" not in text  # it is the better quantizer
    assert "This calibration has no general text (wikitext2)." in text and hint in text

    one_task = {**learned, "calib": "mbpp", "tasks": ["mbpp"]}
    assert "`--calib wikitext2:0.75,mbpp:0.25`" in "\n".join(_quantizer(one_task))
    for calib in ("wikitext2:0.5,gsm8k:0.25,arc_easy:0.25", "gsm8k:0.5,wikitext2:0.5", "wikitext2"):
        for summary in (task_only, learned):
            assert "no general text" not in "\n".join(_quantizer({**summary, "calib": calib}))
    assert "no general text" in "\n".join(_quantizer({**learned, "calib": "wikitext2:0,gsm8k:1"}))


def test_run_report_names_the_bfloat16_option_only_on_a_cpu_that_computes_it_natively():
    """On a CPU with native bfloat16 the faster option at AutoRound's quality follows the better one, with its own
    estimate; not on a CPU without it, not when the run already computed in bfloat16, and a GPU run is told the
    better one without a CPU time estimate."""
    from tasa.config import BETTER_QUANTIZER, BETTER_QUANTIZER_BF16
    from tasa.report.run_report import _quantizer

    base = {"quantizer": "gptq", "seconds": {"quantize": 100.0}, "calib": "wikitext2", "tasks": ["gsm8k"]}
    fast, ratio = BETTER_QUANTIZER_BF16
    line = f"`{fast}` learns with the model in bfloat16"
    text = "\n".join(_quantizer({**base, "device": "cpu", "bfloat16_native": True, "dtype": None}))
    assert line in text and f"about {ratio:g}x this quantizer's time, about {ratio * 100:.0f} s for this run" in text
    assert text.index(f"`{BETTER_QUANTIZER[0]}`") < text.index(line)
    assert line in "\n".join(_quantizer({**base, "bfloat16_native": True, "dtype": "float32"}))
    assert "made by gptq, the model in bfloat16 while quantized, in 100 s." in "\n".join(
        _quantizer({**base, "dtype": "bfloat16"}))
    for summary in ({**base, "bfloat16_native": False}, base, {**base, "bfloat16_native": True, "dtype": "bfloat16"},
                    {**base, "bfloat16_native": True, "quantizer": "learned rounding (128 steps per layer)"}):
        assert "learns with the model in bfloat16" not in "\n".join(_quantizer(summary))
    gpu = "\n".join(_quantizer({**base, "device": "cuda:0", "bfloat16_native": True}))
    assert f"On a GPU, `{BETTER_QUANTIZER[0]}`" in gpu and "s for this run" not in gpu and line not in gpu


def test_run_report_gives_the_command_that_requantizes_the_runs_plan():
    """The command names the run's plan, calibration settings and the option named last (the bfloat16 one on such a
    CPU), with the mixed calibration where the run's has no general text; a summary without those settings (a run
    of an earlier version) gets no command; a learned-rounding run none."""
    from tasa.config import BETTER_QUANTIZER, BETTER_QUANTIZER_BF16
    from tasa.report.run_report import _quantizer

    run = {"quantizer": "gptq", "seconds": {"quantize": 10.0}, "calib": "gsm8k:0.5,arc_easy:0.5", "model": "m",
           "tasks": ["gsm8k", "arc_easy"], "output_dir": "/r", "nsamples": 64, "seqlen": 512, "seed": 3}
    start = ("`tasa quantize --model m --plan /r/plan.json --calib wikitext2:0.75,gsm8k:0.125,arc_easy:0.125 "
             "--nsamples 64 --seqlen 512 --seed 3 ")
    assert start + f"{BETTER_QUANTIZER[0]} --output-dir /r/model-learned`" in "\n".join(_quantizer(run))
    native = "\n".join(_quantizer({**run, "bfloat16_native": True, "calib": "wikitext2:0.5,gsm8k:0.5"}))
    assert (f"--calib wikitext2:0.5,gsm8k:0.5 --nsamples 64 --seqlen 512 --seed 3 {BETTER_QUANTIZER_BF16[0]} "
            "--output-dir /r/model-learned`") in native
    gpu = "\n".join(_quantizer({**run, "device": "cuda:1", "calib": "wikitext2"}))
    assert "`tasa quantize --model m --device cuda:1 --plan /r/plan.json --calib wikitext2 " in gpu
    assert "tasa quantize" not in "\n".join(_quantizer({k: v for k, v in run.items() if k != "nsamples"}))
    assert "tasa quantize" not in "\n".join(_quantizer({**run, "quantizer": "learned rounding (128 steps)"}))
