"""Stage: reports (Markdown, HTML, PNG plots) from the JSON artifacts of earlier stages."""
