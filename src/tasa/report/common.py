"""Report helpers shared by the profile, mixture and run reports: figures to PNG, Markdown to HTML, all
written atomically (a killed report leaves the previous file or none, never half of one)."""
from __future__ import annotations

import html
import io
from pathlib import Path

from tasa.artifacts import write_bytes_atomic

STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}img{max-width:100%}")


def save_figure(fig, path: Path) -> str:
    """Write ``fig`` as a PNG at ``path`` (atomically) and close it; returns the file name for the report."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
    return path.name


def markdown_to_html(md: str, title: str) -> str:
    """A standalone HTML page of ``md`` (CommonMark with tables, rendered by markdown-it-py; raw HTML in the
    Markdown is escaped, not passed through)."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(md)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n{body}</body></html>\n")


def write_pages(directory: Path, markdown: str, title: str) -> Path:
    """report.md and report.html in ``directory``, each written atomically; returns report.md's path."""
    write_bytes_atomic(directory / "report.md", markdown.encode())
    write_bytes_atomic(directory / "report.html", markdown_to_html(markdown, title).encode())
    return directory / "report.md"
