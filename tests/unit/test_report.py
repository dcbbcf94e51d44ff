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
