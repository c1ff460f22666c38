"""YAML experiment specs -> frozen, validated dataclasses.

A spec file has `name`, `description`, `base` (one run: vaelab.runspec), an optional `search`
(vaelab.search) and an optional `ledger` (the published number its base reproduces: `vaelab ledger`).
Every field is addressed by its dotted path (`model.z_dim`), and that same path is used by `--set`, MLflow
params and reports. This module reads the file and applies overrides; the run's fields and
the search's live below it, so the three import downward only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vaelab.checks import (
    Check,
    Choice,
    Float,
    Int,
    Name,
    Optional,
    SpecError,
    Text,
    as_list,
    did_you_mean,
    fail,
    show,
    show_key,
)
from vaelab.runspec import (  # re-exported: most code reads a run's names through this module
    HOW_NOT_WHAT,
    RUN_HASH_VERSION,
    SECTIONS,
    DataSpec,
    LossSpec,
    RunSpec,
    _leaves,
    check_run,
    field_check,
    flatten,
    is_section,
    parse_run,
    run_to_yaml,
    to_dict,
    unused_keys,
    with_values,
)
from vaelab.search import SEARCH_KEYS, GridSearch, OptunaSearch, parse_search

__all__ = ["HOW_NOT_WHAT", "RUN_HASH_VERSION", "SECTIONS", "DataSpec", "Ledger", "LossSpec", "Protocol", "RunSpec",
           "Spec", "SpecError",
           "apply_overrides", "check_run", "describe_fields", "field_check", "flatten", "load_spec", "parse_run",
           "parse_spec", "run_to_yaml", "to_dict", "unused_keys", "with_values"]


@dataclass(frozen=True)
class Protocol:
    """How the paper trained and evaluated the published row, in its words (ledger.protocol)."""

    binarization: str  # dynamic | static | none: what base.data.binarize must be
    split: str
    epochs: str
    early_stopping: str


@dataclass(frozen=True)
class Ledger:
    """A published number that a spec's base reproduces (`vaelab ledger`): a test NLL in nats per image."""

    paper: str
    table: str
    row: str
    published: float  # -log p(x), nats per image, as the table gives it (its sign dropped)
    published_pm: float | None  # the table's ±; None where it gives none
    k: int  # importance samples of the published estimate: base.eval.iw_samples must be the same
    protocol: Protocol
    tolerance: float  # nats: |vaelab - published| <= tolerance passes
    sources: tuple[str, ...]  # what each number and setting was checked against
    unverified: tuple[str, ...] = ()  # ledger fields or base keys that could not be checked
    differs: tuple[str, ...] = ()  # where vaelab's run departs from the paper's protocol


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()  # `vaelab keys`' default of a ledger key every row must state


@dataclass(frozen=True)
class _Texts(Check):
    """One or more lines of text: a string, or a list of strings (a list may be empty)."""

    max_items: int = 64

    def describe(self) -> str:
        return "a string or a list of strings"

    def parse(self, value: Any, path: str) -> tuple[str, ...]:
        if isinstance(value, str):
            return (Text().parse(value, path),)
        if not isinstance(value, list) or len(value) > self.max_items:
            raise fail(path, self.describe(), value)
        return tuple(Text().parse(item, f"{path}[{i}]") for i, item in enumerate(value))


@dataclass(frozen=True)
class LedgerKey:
    """A key of the ledger section: its check, default (REQUIRED: every row states it) and help."""

    name: str
    default: Any
    check: Check
    doc: str


PROTOCOL_KEYS = (
    LedgerKey("binarization", REQUIRED, Choice(("dynamic", "static", "none")),
              "how the paper binarised its images; base.data.binarize must say the same"),
    LedgerKey("split", REQUIRED, Text(1000), "the paper's train / validation / test split"),
    LedgerKey("epochs", REQUIRED, Text(1000), "how long the paper trained (and its learning-rate schedule)"),
    LedgerKey("early_stopping", REQUIRED, Text(1000), "the paper's early stopping, or none"),
)
LEDGER_KEYS = (
    LedgerKey("paper", REQUIRED, Text(1000), "the paper: authors, year, title, where to find it"),
    LedgerKey("table", REQUIRED, Text(200), "the table the number is in"),
    LedgerKey("row", REQUIRED, Text(1000), "the row (and column) of that table"),
    LedgerKey("published", REQUIRED, Float(0.0, min_open=True), "the published test NLL, nats per image (the "
                                                                 "table's -log p(x), its sign dropped)"),
    LedgerKey("published_pm", REQUIRED, Optional(Float(0.0)), "the table's +- beside it; null where it gives none"),
    LedgerKey("k", REQUIRED, Int(1, 10_000_000), "importance samples of the published estimate; "
                                                 "base.eval.iw_samples must be the same"),
    LedgerKey("protocol", REQUIRED, Text(), "the paper's protocol: " + ", ".join(k.name for k in PROTOCOL_KEYS)),
    LedgerKey("tolerance", REQUIRED, Float(0.0, min_open=True), "nats: the row passes when |vaelab - published| is "
                                                                 "at most this"),
    LedgerKey("sources", REQUIRED, _Texts(), "what each number and setting was checked against"),
    LedgerKey("unverified", (), _Texts(), "ledger fields (published, table, ...) or base keys (model.hidden, ...) "
                                          "that could not be checked; `vaelab ledger` shows them"),
    LedgerKey("differs", (), _Texts(), "where the run departs from the paper's protocol, and why"),
)


def _keyed(raw: Any, keys: tuple[LedgerKey, ...], path: str) -> dict[str, Any]:
    """The checked values of a ledger mapping: each key known (else did-you-mean), each required one present."""
    if not isinstance(raw, Mapping):
        raise fail(path, "a mapping with keys " + ", ".join(k.name for k in keys), raw)
    names = [k.name for k in keys]
    for key in raw:
        if key not in names:
            raise SpecError(f"{path}.{show_key(key)}: unknown key; allowed: {', '.join(names)}"
                            f"{did_you_mean(key, names)}")
    values = {}
    for key in keys:
        if key.name not in raw:
            if key.default is REQUIRED:
                raise SpecError(f"{path}.{key.name}: missing; a ledger row states {key.doc}")
            values[key.name] = key.default
        elif key.name != "protocol":
            values[key.name] = key.check.parse(raw[key.name], f"{path}.{key.name}")
    return values


def parse_ledger(raw: Any, base: RunSpec, path: str = "ledger") -> Ledger:
    """The ledger section, checked, and checked against the base run it describes: the run binarises and
    estimates as the paper did (k samples on the whole test split), so its number is comparable."""
    values = _keyed(raw, LEDGER_KEYS, path)
    ledger = Ledger(**values, protocol=Protocol(**_keyed(raw["protocol"], PROTOCOL_KEYS, f"{path}.protocol")))
    if ledger.protocol.binarization != base.data.binarize:
        raise SpecError(f"{path}.protocol.binarization: {ledger.protocol.binarization}, but base.data.binarize is "
                        f"{base.data.binarize}: the row's run must binarise as the paper did")
    if ledger.k != base.eval.iw_samples:
        raise SpecError(f"{path}.k: {ledger.k}, but base.eval.iw_samples is {base.eval.iw_samples}: the row's run "
                        "must estimate with the paper's k")
    if base.eval.iw_images is not None or base.eval.iw_capped:
        raise SpecError(f"{path}: the published number is over the whole test split; set base.eval.iw_images null "
                        "and base.eval.iw_capped false")
    known = [k.name for k in LEDGER_KEYS] + [f"protocol.{k.name}" for k in PROTOCOL_KEYS] + list(flatten(base))
    for i, name in enumerate(ledger.unverified):
        if name not in known:
            raise SpecError(f"{path}.unverified[{i}]: {show(name)} is neither a ledger key nor a run key"
                            f"{did_you_mean(name, known)}")
    return ledger


@dataclass(frozen=True)
class Spec:
    name: str
    description: str = ""
    base: RunSpec = field(default_factory=RunSpec)
    search: GridSearch | OptunaSearch | None = None
    ledger: Ledger | None = None


TOP_LEVEL = ("name", "description", "base", "search", "ledger")


def parse_spec(raw: Any) -> Spec:
    if not isinstance(raw, Mapping):
        raise fail("(top level)", "a mapping with keys " + ", ".join(TOP_LEVEL), raw)
    for key in raw:
        if key not in TOP_LEVEL:
            raise SpecError(f"{show_key(key)}: unknown key; allowed: {', '.join(TOP_LEVEL)}"
                            f"{did_you_mean(key, TOP_LEVEL)}")
    if "name" not in raw:
        raise SpecError("name: missing; every spec needs a name (it names the MLflow experiment)")
    base = parse_run(raw.get("base"))
    if raw.get("ledger") is not None and raw.get("search") is not None:
        raise SpecError("search: a ledger row is one run, the paper's; leave out search")
    return Spec(
        name=Name().parse(raw["name"], "name"),
        description=Text().parse(raw.get("description") or "", "description"),
        base=base,
        search=parse_search(raw["search"], base) if raw.get("search") is not None else None,
        ledger=parse_ledger(raw["ledger"], base) if raw.get("ledger") is not None else None,
    )


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such spec file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"{path}: cannot read spec ({err})") from None
    try:
        # safe_load: a spec is data; tags such as !!python/object are refused.
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError(f"{path}:{line}: invalid YAML ({problem})") from None
    except RecursionError:  # [[[[...]]]] a few thousand deep: PyYAML's composer recurses per level
        raise SpecError(f"{path}: invalid YAML (nested too deeply)") from None
    except ValueError as err:  # what a scalar's constructor refuses: 2019-02-30, an int of 5000 digits
        raise SpecError(f"{path}: invalid YAML ({str(err).split(';')[0][:120]})") from None


def load_spec(path: str | Path, overrides: list[str] | None = None) -> Spec:
    """Read, override and validate a spec file."""
    raw = read_yaml(Path(path))
    spec = parse_spec(raw)
    return apply_overrides(spec, overrides or [])


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SpecError(f"{dotted}: not a spec path")
    node[parts[-1]] = value


def apply_overrides(spec: Spec, overrides: list[str]) -> Spec:
    """Apply `--set data.subset=1000` style overrides to the base run; values are
    YAML-typed and validated exactly like the file."""
    if not overrides:
        return spec
    raw = to_dict(spec.base)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SpecError(f"--set {item!r}: expected KEY=VALUE, e.g. model.z_dim=10")
        check = field_check(key)
        if check is None and not is_section(key):
            known = [dotted for section, cls in SECTIONS.items() for dotted, _ in _leaves(cls, f"{section}.")]
            suggestion = did_you_mean(key, known)
            rest = f"{suggestion} (`vaelab keys` lists them all)" if suggestion else \
                " (e.g. model.z_dim; `vaelab keys` lists them all)"
            raise SpecError(f"{key}: not a spec path{rest}")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        if check is not None and check.hint(value):  # `model.hidden=512,256`: the shell needs the brackets quoted
            raise SpecError(f"--set {key}: expected {check.describe()}, got {show(value)}; a list is written in "
                            f"brackets, quoted for the shell: --set '{key}={as_list(value)}'")
        _set_dotted(raw, key, value)
    try:
        return dataclasses.replace(spec, base=parse_run(raw, path=""))
    except SpecError as err:
        raise SpecError(f"--set {err}") from None


def describe_fields() -> list[tuple[str, Any, str, str]]:
    """(dotted path, default, allowed, doc) for every field, then the search section's keys that
    have a default and the ledger section's keys: used by `vaelab keys`."""
    rows = []
    for section, cls in SECTIONS.items():
        for dotted, f in _leaves(cls, f"{section}."):
            rows.append((dotted, f.default, f.metadata["check"].describe(), f.metadata["doc"]))
    rows += [(f"search.{key.name}", key.default, key.check.describe(), key.doc) for key in SEARCH_KEYS]
    rows += [(f"ledger.{key.name}", key.default, key.check.describe(), key.doc) for key in LEDGER_KEYS
             if key.name != "protocol"]
    rows += [(f"ledger.protocol.{key.name}", key.default, key.check.describe(), key.doc) for key in PROTOCOL_KEYS]
    return rows
