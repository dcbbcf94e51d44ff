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
    assert "about 4.6x this quantizer's time on a CPU, about 460 s for this run" in text
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
