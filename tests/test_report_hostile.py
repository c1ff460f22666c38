"""A study whose spec, swept values and tags carry markup: report.md and report.html show that text,
they never run it. A real tiny grid sweep over two data folders whose names are payloads (a swept
string value), a description full of payloads and a hostile tag in the MLflow store; the HTML is
checked by parsing it and by opening it in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
import warnings
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import make_idx_folder
from tests.test_sweep import make_sweep, write_spec
from vaelab.report import write_study_report
from vaelab.report.html import write_html
from vaelab.spec import load_spec

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Each payload that runs leaves a mark the DOM shows: the page's title or an attribute on <body>.
DESCRIPTION = ("Hostile <script>document.title='pwned-description'</script> text, "
               "<img src=x onerror=\"document.body.setAttribute('data-pwned','description')\"> an image, "
               "[a live link](javascript:document.title='pwned-link') and "
               "[another](JaVa&#115;cript:document.title='pwned-entity'), "
               "and [the docs](https://example.org/docs).")
# Folder names (a swept string value, data.root): markup, a pipe, a backtick, a backslash, broken mathtext
# for the figures' labels and a terminal escape sequence.
ROOTS = ("a|b <img src=x onerror=document.body.setAttribute('data-pwned','root')> `c\\ $\\frac{$ \x1b[31mred",
         "<script>document.title='pwned-root'</script>")
COMMIT_TAG = "<svg onload=document.body.setAttribute('data-pwned','tag')>"


@pytest.fixture(scope="module")
def hostile_report(tmp_path_factory) -> tuple[Path, Path, list[str], list[str]]:
    """(report.md, report.html, the two data.root values, the warnings the report raised) of a two-run grid
    over hostile folder names."""
    tmp_path = tmp_path_factory.mktemp("hostile")
    roots = [str(make_idx_folder(tmp_path / "roots" / name, n_train=128, n_test=64)) for name in ROOTS]
    path = write_spec(tmp_path, Path(roots[0]), {"kind": "grid", "params": {"data.root": roots}, "seeds": [0]},
                      name="hostile_demo")
    body = yaml.safe_load(path.read_text())
    body["base"]["train"]["epochs"] = 1
    path.write_text(yaml.safe_dump({**body, "description": DESCRIPTION}))
    sweep = make_sweep(tmp_path, path)
    parent = sweep.prepare()
    sweep.work(parent)
    sweep.finish(parent)
    client = MlflowClient(sweep.tracker.uri)
    experiment = client.get_experiment_by_name("hostile_demo")
    assert experiment is not None
    child = next(r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags)
    client.set_tag(child.info.run_id, "vaelab.git_commit", COMMIT_TAG)  # a store someone else writes to
    with warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        report = write_study_report(load_spec(path), sweep.tracker, tmp_path / "out")
        page = write_html(report)
    return report, page, roots, [str(w.message) for w in raised]


class Page(HTMLParser):
    """Every element with its attributes, each table's rows of cells, and the text, as a browser parses them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.tables: list[list[list[str]]] = []
        self.text: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "a" and self._cell is not None:
            self._cell.append(f"<a {dict(attrs).get('href')}>")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def parsed(page: str) -> Page:
    parser = Page()
    parser.feed(page)
    return parser


def shown(value: str) -> str:
    """A value as the report shows it: as written, less control characters."""
    return value.replace("\x1b", "")


def scheme(url: str) -> str | None:
    """The scheme a browser reads in an (already entity-decoded) attribute: it skips whitespace and controls."""
    found = re.match(r"([a-z][a-z0-9+.-]*):", re.sub(r"[\x00-\x20\x7f]", "", url).lower())
    return found.group(1) if found else None


def markdown_cells(line: str) -> list[str]:
    """A markdown table row's cells, split at the pipes that are not backslash-escaped."""
    cells, cell, chars = [], "", iter(line.strip().removeprefix("|").removesuffix("|"))
    for char in chars:
        if char == "\\":
            cell += char + next(chars, "")
        elif char == "|":
            cells.append(cell.strip())
            cell = ""
        else:
            cell += char
    return [*cells, cell.strip()]


def test_the_html_report_runs_nothing_from_the_spec_the_params_or_the_tags(hostile_report):
    _, html_path, roots, _ = hostile_report
    page = parsed(html_path.read_text(encoding="utf-8"))
    tags = [tag for tag, _ in page.elements]
    assert "script" not in tags and "svg" not in tags
    assert tags.count("img") == sum(1 for _, attrs in page.elements if attrs.get("src", "").startswith("data:image/"))
    assert not [(tag, key) for tag, attrs in page.elements for key in attrs if key.startswith("on")]
    links = [attrs["href"] for tag, attrs in page.elements if "href" in attrs]
    assert links and not [href for href in links if scheme(href) not in ("http", "https", "mailto", None)], links
    assert "https://example.org/docs" in links  # a safe link in the description stays live
    # The markup is shown as text, as written.
    text = "".join(page.text)
    assert "<script>document.title='pwned-description'</script>" in text and COMMIT_TAG[:10] in text
    assert all(shown(root) in text for root in roots)


def test_a_pipe_in_a_value_keeps_every_column_in_place(hostile_report):
    report, html_path, roots, _ = hostile_report
    results = report.read_text(encoding="utf-8").split("## Results")[1]
    lines = [line for line in results.splitlines() if line.startswith("|")]
    header = markdown_cells(lines[0])
    assert header[0] == "data.root" and header[-1] == "runs"
    assert [len(markdown_cells(line)) for line in lines[2:]] == [len(header)] * len(roots)

    table = parsed(html_path.read_text(encoding="utf-8")).tables[0]
    assert [len(row) for row in table] == [len(table[0])] * (len(roots) + 1)
    assert sorted(row[0] for row in table[1:]) == sorted(map(shown, roots))  # the whole value, in its column
    assert all(re.fullmatch(r"<a http://\S+/runs/[0-9a-f]{32}\S*>[0-9a-f]{8}", row[-1]) for row in table[1:])


@pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (Debian package chromium)")
def test_opening_the_html_report_in_a_browser_runs_no_payload(hostile_report, tmp_path: Path):
    _, html_path, _, _ = hostile_report
    assert CHROMIUM is not None
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000",
                           f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom", html_path.as_uri()],
                          capture_output=True, text=True, timeout=180)
    title = re.search(r"<title>(.*?)</title>", done.stdout, flags=re.S)
    assert title is not None, done.stderr[-2000:]  # the page was opened and dumped
    assert title.group(1) == "Study hostile_demo"
    body = re.search(r"<body[^>]*>", done.stdout)
    assert body is not None and "data-pwned" not in body.group(0)
    assert "&lt;script&gt;document.title='pwned-root'&lt;/script&gt;" in done.stdout  # shown, not run


def test_the_report_prints_no_control_character_from_a_value(hostile_report):
    report, _, _, raised = hostile_report
    assert not [message for message in raised if "\x1b" in message]  # e.g. matplotlib's missing-glyph warning
    assert "\x1b" not in report.read_text(encoding="utf-8")
    assert (report.parent / "figures" / "by_data_root.png").is_file()  # the figure was drawn, labels and all
