"""The report as one HTML file for sharing: the same markdown rendered (tables included), every figure
inlined as a data URI, so the file needs nothing beside it.

The markdown holds text from specs, params and tags, and the file is opened by others: raw HTML in it
is shown as text, never passed through, and a link or image stays live only with a safe address."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from urllib.parse import unquote
from xml.etree.ElementTree import Element

import markdown
from markdown.treeprocessors import Treeprocessor

STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0;display:block;overflow-x:auto}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right;white-space:nowrap}th{background:#f3f3f3}
img{max-width:100%;display:block;margin:.5em 0}code{background:#f3f3f3;padding:0 3px}"""

# A second line of defence, should markup ever get through: the page may run no script and load nothing
# but its own style and images (inlined figures; a description's images on the web).
POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data: http: https:"
# Addresses a link or image may keep: these schemes, or none (a relative path, `#fragment`, `?query`).
SAFE_SCHEMES = frozenset({"http", "https", "mailto"})
_SCHEME = re.compile(r"([a-z][a-z0-9+.-]*):")
_IGNORED_BY_BROWSERS = re.compile(r"[\x00-\x20\x7f]")  # `java\tscript:` is `javascript:` to a browser


def safe_url(url: str) -> bool:
    """Whether `url`, read as a browser reads an attribute (entities decoded, whitespace and control
    characters dropped), has a safe scheme or none."""
    seen = _IGNORED_BY_BROWSERS.sub("", html.unescape(url)).lower()
    scheme = _SCHEME.match(seen)
    return scheme is None or scheme.group(1) in SAFE_SCHEMES


class _SafeAddresses(Treeprocessor):
    """Drops every href or src that is not safe_url; an image from the report's own figures/ is inlined."""

    def __init__(self, md: markdown.Markdown, folder: Path) -> None:
        super().__init__(md)
        self.figures = (folder / "figures").resolve()

    def run(self, root: Element) -> None:
        for element in root.iter():
            for attribute in ("href", "src"):
                value = element.get(attribute)
                if value is None:
                    continue
                inlined = self._inlined(value) if attribute == "src" else None
                if inlined is not None:
                    element.set(attribute, inlined)
                elif not safe_url(value):
                    del element.attrib[attribute]

    def _inlined(self, src: str) -> str | None:
        """A data URI of a PNG under figures/ (only there: a description's `![](/home/me/x.png)` must not
        put a private file into a shared one); None for anything else."""
        if not safe_url(src) or re.match(r"[a-z][a-z0-9+.-]*:|/", src.lower()):
            return None
        source = (self.figures.parent / unquote(html.unescape(src))).resolve()
        if source.suffix != ".png" or not source.is_relative_to(self.figures) or not source.is_file():
            return None
        return "data:image/png;base64," + base64.b64encode(source.read_bytes()).decode()


def render(text: str, folder: Path) -> str:
    """`text` (markdown) as HTML with raw HTML shown as text and only safe addresses; images under
    `folder`/figures inlined."""
    md = markdown.Markdown(extensions=["tables"])
    md.preprocessors.deregister("html_block")  # raw HTML blocks and tags stay text: the serializer escapes them
    md.inlinePatterns.deregister("html")
    md.treeprocessors.register(_SafeAddresses(md, folder), "vaelab_safe_addresses", -1)  # after unescaping
    return md.convert(text)


def write_html(report: Path) -> Path:
    """report.html beside report.md, figures inlined; returns its path."""
    text = report.read_text(encoding="utf-8")
    body = render(text, report.parent)
    title = html.escape(text.splitlines()[0].lstrip("# ").replace("`", "")) if text else "report"
    page = (f"<!doctype html><html><head><meta charset='utf-8'>"
            f"<meta http-equiv='Content-Security-Policy' content=\"{POLICY}\">"
            f"<title>{title}</title><style>{STYLE}</style></head><body>{body}</body></html>\n")
    out = report.with_suffix(".html")
    out.write_text(page, encoding="utf-8")
    return out
