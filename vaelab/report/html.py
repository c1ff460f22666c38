"""The report as one HTML file for sharing: the same markdown rendered (tables included), every figure
inlined as a data URI, so the file needs nothing beside it."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

import markdown

STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0;display:block;overflow-x:auto}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right;white-space:nowrap}th{background:#f3f3f3}
img{max-width:100%;display:block;margin:.5em 0}code{background:#f3f3f3;padding:0 3px}"""


def write_html(report: Path) -> Path:
    """report.html beside report.md, figures inlined; returns its path."""
    text = report.read_text(encoding="utf-8")
    body = markdown.markdown(text, extensions=["tables"])

    def inline(match: re.Match) -> str:
        source = report.parent / html.unescape(match.group(1))
        if not source.is_file():
            return match.group(0)
        data = base64.b64encode(source.read_bytes()).decode()
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="([^"]+\.png)"', inline, body)
    title = html.escape(text.splitlines()[0].lstrip("# ").replace("`", "")) if text else "report"
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style>"
            f"</head><body>{body}</body></html>\n")
    out = report.with_suffix(".html")
    out.write_text(page, encoding="utf-8")
    return out
