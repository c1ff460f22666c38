"""The resolved spec a study was made from, kept in the study (user attributes
vaelab.spec_hash and vaelab.spec), so that a later invocation with another spec
(a `--set`, an edited file) cannot mix its runs into the study unnoticed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from functools import cache
from typing import Any

import optuna

from vaelab.spec import HOW_NOT_WHAT, RunSpec, Spec, flatten, to_dict
from vaelab.sweeps.queue import SPEC, SPEC_HASH
from vaelab.sweeps.storage import SweepError

# Where the study is stored and its images are held, not what it runs.
IGNORED = {"search.storage", *HOW_NOT_WHAT}
# What is done with finished runs, not how they are trained: may change in a study.
LATER = "search.evaluate"


def _plain(value: Any) -> Any:
    """JSON's view of a value (tuples become lists), so stored and fresh records compare equal."""
    return json.loads(json.dumps(value, default=str))


def spec_record(spec: Spec) -> dict[str, Any]:
    """Dotted key -> value: the resolved base (model.z_dim, ...) and the search
    (search.kind, search.params.loss.beta, ...)."""
    record: dict[str, Any] = dict(flatten(spec.base))
    search = to_dict(spec.search)
    for key, value in search.items():
        if key == "params":
            record.update({f"search.params.{name}": values for name, values in value})
        else:
            record[f"search.{key}"] = value
    return _plain({k: v for k, v in record.items() if k not in IGNORED and not k.startswith(LATER)})


@cache
def _defaults(search_type: type) -> dict[str, Any]:
    """The default of each dotted key that has one: every base key, and the search's optional keys."""
    defaults = dict(flatten(RunSpec()))
    defaults.update({f"search.{f.name}": f.default for f in dataclasses.fields(search_type)
                     if f.default is not dataclasses.MISSING})
    return _plain(defaults)


def spec_hash(record: dict[str, Any], search_type: type) -> str:
    """A short identity of a record. Values equal to their defaults do not count, so a
    field added in a later vaelab version does not change a study's identity."""
    defaults = _defaults(search_type)
    changed = {k: v for k, v in record.items() if k not in defaults or v != defaults[k]}
    return hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:16]


def differences(old: dict[str, Any], new: dict[str, Any], search_type: type) -> list[str]:
    """`key old -> new` for each dotted key whose value differs (a key one side lacks
    counts as its default)."""
    defaults = _defaults(search_type)
    missing = "(unset)"
    lines = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, defaults.get(key, missing)), new.get(key, defaults.get(key, missing))
        if before != after:
            lines.append(f"{key} {_show(before)} -> {_show(after)}")
    return lines


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def fixed_in_study(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Swept keys whose Optuna distribution `new` changes where the study cannot: Optuna keeps one
    distribution per parameter for a study's life, so a key's kind, log scale and categorical choices (a
    grid's values and seeds) stay as its first trials recorded them."""
    before = _distributions(old)
    return [key for key, fixed in _distributions(new).items() if key in before and before[key] != fixed]


def _distributions(record: dict[str, Any]) -> dict[str, list[Any]]:
    prefix = "search.params."
    grid = record.get("search.kind", "grid") == "grid"
    fixed: dict[str, list[Any]] = {"train.seed": ["categorical", record.get("search.seeds")]} if grid else {}
    for key, value in record.items():
        if not key.startswith(prefix):
            continue
        if grid or not isinstance(value, dict):  # each grid key is a categorical of its values (sweeps.points)
            fixed[key[len(prefix):]] = ["categorical", value]
        elif value.get("kind") == "categorical":
            fixed[key[len(prefix):]] = ["categorical", value.get("choices")]
        else:  # a numeric range may change; its type and scale may not
            fixed[key[len(prefix):]] = [value.get("kind"), bool(value.get("log"))]
    return fixed


def base_changed(changes: list[str]) -> bool:
    """Whether `changes` (check_spec's) touch what runs are, not only how the search goes on."""
    return any(not line.startswith("search.") for line in changes)


def study_spec_hash(spec: Spec) -> str:
    """The identity `check_spec` stores for `spec` (and the sweep's parent run carries)."""
    return spec_hash(spec_record(spec), type(spec.search))


def check_spec(study: optuna.Study, spec: Spec, allow_change: bool = False) -> list[str]:
    """Compare `spec` with the spec `study` was made from. The first time, store it.
    If it differs, raise SweepError naming the differences, unless `allow_change`:
    then store the new one and return the differences ([] when nothing changed)."""
    record = spec_record(spec)
    digest = study_spec_hash(spec)
    stored = study.user_attrs.get(SPEC_HASH)
    if stored == digest:
        return []
    changes: list[str] = []
    if stored is not None:
        old = json.loads(study.user_attrs.get(SPEC) or "{}")
        changes = differences(old, record, type(spec.search)) or [f"spec hash {stored} -> {digest}"]
        fixed = fixed_in_study(old, record)
        if fixed:  # its trials would fail in Optuna's storage: no flag can allow it
            named = {"search.seeds" if k == "train.seed" else f"search.params.{k}" for k in fixed}
            shown = "; ".join(c for c in changes if c.split(" ", 1)[0] in named)
            raise SweepError(f"study '{spec.name}' cannot take this spec ({shown or ', '.join(fixed)}): Optuna keeps "
                             f"the values of each swept key for a study's life; start a new study (another "
                             f"`name:` in the spec)")
        if not allow_change:
            shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
            raise SweepError(f"study '{spec.name}' was made from another spec ({shown}): to run this spec, "
                             f"start a new study (another `name:` in the spec), or pass --allow-spec-change "
                             f"to replace the study's spec and add its points to this study")
    study.set_user_attr(SPEC, json.dumps(record, sort_keys=True))
    study.set_user_attr(SPEC_HASH, digest)
    return changes
