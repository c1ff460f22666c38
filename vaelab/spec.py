"""YAML experiment specs -> frozen, validated dataclasses.

A spec file has `name`, `description`, `base` (one run: vaelab.runspec) and an optional `search`
(vaelab.search). Every field is addressed by its dotted path (`model.z_dim`), and that same path is used by
`--set`, MLflow params and reports. This module reads the file and applies overrides; the run's fields and
the search's live below it, so the three import downward only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vaelab.checks import Name, SpecError, Text, as_list, did_you_mean, fail, show, show_key
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

__all__ = ["HOW_NOT_WHAT", "RUN_HASH_VERSION", "SECTIONS", "DataSpec", "LossSpec", "RunSpec", "Spec", "SpecError",
           "apply_overrides", "check_run", "describe_fields", "field_check", "flatten", "load_spec", "parse_run",
           "parse_spec", "run_to_yaml", "to_dict", "unused_keys", "with_values"]


@dataclass(frozen=True)
class Spec:
    name: str
    description: str = ""
    base: RunSpec = field(default_factory=RunSpec)
    search: GridSearch | OptunaSearch | None = None


TOP_LEVEL = ("name", "description", "base", "search")


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
    return Spec(
        name=Name().parse(raw["name"], "name"),
        description=Text().parse(raw.get("description") or "", "description"),
        base=base,
        search=parse_search(raw["search"], base) if raw.get("search") is not None else None,
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
    have a default: used by `vaelab keys`."""
    rows = []
    for section, cls in SECTIONS.items():
        for dotted, f in _leaves(cls, f"{section}."):
            rows.append((dotted, f.default, f.metadata["check"].describe(), f.metadata["doc"]))
    rows += [(f"search.{key.name}", key.default, key.check.describe(), key.doc) for key in SEARCH_KEYS]
    return rows
