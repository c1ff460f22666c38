"""Text from a spec, a param or a tag made safe where the report renders it: markdown prose shown as
written (raw HTML as text), table cells that cannot end early, link destinations that cannot break out,
and no control character for a terminal or a figure to act on."""

from __future__ import annotations

import re
from html import escape

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # tab and newline stay in prose
# What would end a markdown link's destination or a table cell early, and what a URL needs encoded anyway.
_URL_BREAKERS = {ord(c): f"%{ord(c):02X}" for c in " \t\n\r\"()<>\\`|"}


def md_text(value: object) -> str:
    """Prose from a user (a spec's description keeps its markdown): raw HTML shown as text, control
    characters dropped."""
    return escape(_CONTROL.sub("", str(value)), quote=False)


def md_cell(value: object) -> str:
    """A value as one markdown table cell, shown as written: on one line, its `|` and backticks unable to
    end the cell or open a code span across cells (which would shift every later column)."""
    text = re.sub(r"\s*[\r\n]+\s*", " ", str(value)).replace("\t", " ")
    text = text.replace("\\", "\\\\").replace("`", "\\`").replace("|", "\\|")
    return md_text(text)


def md_url(url: str) -> str:
    """A URL as a markdown link destination that nothing in it can end early."""
    return _CONTROL.sub("", url).translate(_URL_BREAKERS)
