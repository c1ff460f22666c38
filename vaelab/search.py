"""The `search` section of a spec: a grid (cartesian product x seeds) or an
Optuna search space. Parsing and grid expansion only; running them is vaelab.sweeps.

Every value in a grid list, and every bound or choice of a distribution, is
checked by the same check as the run field it sets, so `model.arch: [mlp, vit]`
fails at `search.params.model.arch[1]` before anything runs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vaelab.checks import Check, Choice, Float, Int, IntList, SpecError, Text, fail, show, show_key
from vaelab.runspec import RunSpec, check_run, field_check, with_values

KINDS = ("grid", "optuna")
SAMPLERS = ("tpe", "random", "cmaes", "qmc", "gp")
PRUNERS = ("none", "median", "hyperband", "successive_halving")
# Optimise on validation metrics only: choosing by test numbers leaks the test set.
METRICS = ("val/loss", "val/elbo", "val/recon", "val/kl", "val/mse")
# The most runs a grid may expand to unless search.max_points says more: a grid is expanded (and
# `--dry-run` prints it) point by point, so 8 keys x 10 values would take minutes and gigabytes.
MAX_POINTS = 10_000


@dataclass(frozen=True)
class SearchKey:
    """A key of the search section that has a default: its check and its help (`vaelab keys`)."""

    name: str
    default: Any
    check: Check
    doc: str


SEARCH_KEYS = (
    SearchKey("metric", "val/loss", Choice(METRICS), "the validation metric a search optimises and ranks runs by"),
    SearchKey("direction", "minimize", Choice(("minimize", "maximize")), "minimize or maximize search.metric"),
    SearchKey("stack", 1, Int(1, 4096), "grid: up to this many points that differ only in loss.beta, train.seed "
                                        "or train.lr train together as one stacked model"),
    SearchKey("max_points", MAX_POINTS, Int(1), "grid: the most runs (points x seeds, summed over a union of "
                                                "grids) a grid may expand to; a bigger one is refused before it is "
                                                "expanded"),
    SearchKey("sampler", "tpe", Choice(SAMPLERS), "optuna: the sampler"),
    SearchKey("pruner", "median", Choice(PRUNERS), "optuna: the pruner of unpromising trials"),
    SearchKey("seed", 0, Int(0, 2**32 - 1), "optuna: the sampler's seed"),
)


def _setting(raw: Mapping, name: str) -> Any:
    """search.<name>, checked, or its default."""
    key = next(key for key in SEARCH_KEYS if key.name == name)
    return key.check.parse(raw.get(name, key.default), f"search.{name}")


@dataclass(frozen=True)
class Distribution:
    """One Optuna search dimension over a run field."""

    kind: str  # "float" | "int" | "categorical"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()


@dataclass(frozen=True)
class FinalEvaluation:
    """search.evaluate: when the sweep is done, evaluate its `top` runs by `by` again
    with these eval.* settings (vaelab evaluate), once each."""

    top: int
    by: str
    overrides: tuple[str, ...] = ()  # "eval.iw_samples=5000", as --set takes them

    def label(self) -> str:
        return f"top {self.top} by {self.by}" + (f" with {', '.join(self.overrides)}" if self.overrides else "")


GridParams = tuple[tuple[str, tuple[Any, ...]], ...]  # (dotted key, values) in spec order


@dataclass(frozen=True)
class GridSearch:
    params: GridParams  # one grid; for a union, every key with every value it takes in any of them
    seeds: tuple[int, ...]
    metric: str = "val/loss"
    direction: str = "minimize"
    storage: str | None = None
    kind: str = "grid"
    stack: int = 1  # up to this many points that differ only in beta/seed/lr train as one stacked model
    evaluate: FinalEvaluation | None = None
    # search.params as a list: a union of grids (each a cartesian product, like scikit-learn's list of
    # parameter grids), so each objective is swept over its own strength key. None for one grid.
    grids: tuple[GridParams, ...] | None = None

    @property
    def parts(self) -> tuple[GridParams, ...]:
        return self.grids if self.grids is not None else (self.params,)


@dataclass(frozen=True)
class OptunaSearch:
    params: tuple[tuple[str, Distribution], ...]
    n_trials: int
    metric: str = "val/loss"
    direction: str = "minimize"
    sampler: str = "tpe"
    pruner: str = "median"
    seed: int = 0
    storage: str | None = None
    kind: str = "optuna"
    evaluate: FinalEvaluation | None = None


@dataclass(frozen=True)
class Point:
    """One run of a sweep: its swept values (including train.seed) and the run spec."""

    values: dict[str, Any]
    run: RunSpec

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.values.items())

    @property
    def config(self) -> str:
        """The configuration this point repeats: its values without train.seed ("base" when only the seed
        is swept). MLflow groups a study's runs by it (the vaelab.config tag), seeds as one group."""
        return ", ".join(f"{k}={v}" for k, v in self.values.items() if k != "train.seed") or "base"


COMMON_KEYS = {"kind", "params", "metric", "direction", "storage", "evaluate"}
EVALUATE_KEYS = {"top", "by", "set"}
GRID_KEYS = COMMON_KEYS | {"seeds", "stack", "max_points"}
OPTUNA_KEYS = COMMON_KEYS | {"n_trials", "sampler", "pruner", "seed"}
DISTRIBUTION_KEYS = {"low", "high", "log", "step", "choices"}


def _check_keys(raw: Mapping, allowed: set[str], path: str) -> None:
    for key in raw:
        if key not in allowed:
            raise SpecError(f"{path}.{show_key(key)}: unknown key; allowed: {', '.join(sorted(allowed))}")


def _param_check(key: Any, path: str):
    check = field_check(key) if isinstance(key, str) else None
    if check is None or key == "train.seed":
        hint = " (use search.seeds for seeds)" if key == "train.seed" else " (a dotted run key such as loss.beta)"
        raise SpecError(f"{path}: not a searchable spec path{hint}")
    return check


def _grid_params(raw: Any, where: str = "search.params") -> GridParams:
    if not isinstance(raw, Mapping) or not raw:
        raise fail(where, "a non-empty mapping of dotted keys to lists of values (or a list of such mappings)", raw)
    params = []
    for key, values in raw.items():
        path = f"{where}.{show_key(key)}"
        check = _param_check(key, path)
        if not isinstance(values, list) or not values:
            raise fail(path, "a non-empty list of values", values)
        parsed = tuple(check.parse(v, f"{path}[{i}]") for i, v in enumerate(values))
        if len(set(map(repr, parsed))) != len(parsed):
            raise SpecError(f"{path}: repeated value in {show(values)}")
        params.append((key, parsed))
    return tuple(params)


def _grids(raw: Any) -> tuple[GridParams, ...]:
    """search.params: one grid, or (a list) the grids of a union."""
    if not isinstance(raw, list):
        return (_grid_params(raw),)
    if not raw:
        raise fail("search.params", "a non-empty list of grids", raw)
    return tuple(_grid_params(part, f"search.params[{i}]") for i, part in enumerate(raw))


def _check_size(grids: tuple[GridParams, ...], seeds: int, cap: int) -> None:
    """Refuse a grid of more than `cap` runs by its size, a product of list lengths, before any
    point of it is made."""
    sizes = [math.prod(len(values) for _, values in grid) for grid in grids]
    runs = sum(sizes) * seeds
    if runs <= cap:
        return
    if len(grids) == 1:
        how = " x ".join(str(len(values)) for _, values in grids[0]) + " values"
    elif len(grids) <= 8:
        how = "(" + " + ".join(map(str, sizes)) + ") points"
    else:
        how = f"the points of {len(grids)} grids"
    how += f" x {seeds} seed" + ("s" if seeds > 1 else "")
    raise SpecError(f"search.max_points: the grid expands to {runs:,} runs ({how}), more than the cap "
                    f"of {cap:,}; sweep fewer values, or raise search.max_points to run them all")


def _grid_union(grids: tuple[GridParams, ...], base: RunSpec) -> GridParams:
    """Every key of a union of grids with the values it takes in any of them (a key a grid does not
    sweep keeps the base value there, so that value counts too)."""
    keys = list(dict.fromkeys(key for grid in grids for key, _ in grid))
    union = []
    for key in keys:
        values: list[Any] = []
        seen: set[str] = set()  # reprs: 1 and 1.0 (or True) are different values here
        for grid in grids:
            for value in dict(grid).get(key, (_base_value(base, key),)):
                if repr(value) not in seen:
                    seen.add(repr(value))
                    values.append(value)
        union.append((key, tuple(values)))
    return tuple(union)


def _base_value(base: RunSpec, key: str) -> Any:
    value: Any = base
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _distribution(key: str, raw: Any, check) -> Distribution:
    path = f"search.params.{key}"
    if not isinstance(raw, Mapping):
        raise fail(path, "a mapping with low/high (and log, step) or choices", raw)
    _check_keys(raw, DISTRIBUTION_KEYS, path)
    return _categorical(path, raw, check) if "choices" in raw else _numeric(path, raw, check)


def _categorical(path: str, raw: Mapping, check) -> Distribution:
    if set(raw) != {"choices"}:
        raise SpecError(f"{path}: choices cannot be combined with low/high/log/step")
    if isinstance(check, IntList):
        raise SpecError(f"{path}: list-valued keys can be searched in grids only")
    choices = raw["choices"]
    if not isinstance(choices, list) or not choices:
        raise fail(f"{path}.choices", "a non-empty list", choices)
    return Distribution("categorical", choices=tuple(check.parse(v, f"{path}.choices[{i}]")
                                                     for i, v in enumerate(choices)))


def _numeric(path: str, raw: Mapping, check) -> Distribution:
    if not isinstance(check, (Int, Float)):
        raise SpecError(f"{path}: a non-numeric key takes `choices: [...]`")
    if "low" not in raw or "high" not in raw:
        raise SpecError(f"{path}: numeric distributions need low and high")
    low, high = check.parse(raw["low"], f"{path}.low"), check.parse(raw["high"], f"{path}.high")
    if low > high:
        raise SpecError(f"{path}: low ({low}) must not exceed high ({high})")
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise fail(f"{path}.log", "true or false", log)
    if log and low <= 0:
        raise SpecError(f"{path}: log scale needs low > 0, got {low}")
    step = raw.get("step")
    if step is not None:
        step = check.parse(step, f"{path}.step")
        if step <= 0 or log:
            raise SpecError(f"{path}.step: expected a step > 0 without log scale, got {step}")
    return Distribution("int" if isinstance(check, Int) else "float", low=low, high=high, log=log, step=step)


def _optuna_params(raw: Any) -> tuple[tuple[str, Distribution], ...]:
    if not isinstance(raw, Mapping) or not raw:
        raise fail("search.params", "a non-empty mapping of dotted keys to distributions", raw)
    return tuple((key, _distribution(key, value, _param_check(key, f"search.params.{show_key(key)}")))
                 for key, value in raw.items())


def _final_evaluation(raw: Any, metric: str) -> FinalEvaluation | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise fail("search.evaluate", "a mapping with top, by and set", raw)
    _check_keys(raw, EVALUATE_KEYS, "search.evaluate")
    settings = raw.get("set") or {}
    if not isinstance(settings, Mapping):
        raise fail("search.evaluate.set", "a mapping of eval.* keys to values", settings)
    overrides = []
    for key, value in settings.items():
        path = f"search.evaluate.set.{show_key(key)}"
        check = field_check(key) if isinstance(key, str) and key.startswith("eval.") else None
        if check is None:
            raise SpecError(f"{path}: not an eval.* key (only evaluation settings change after training)")
        check.parse(value, path)
        overrides.append(f"{key}={'null' if value is None else value}")
    return FinalEvaluation(top=Int(1, 10_000).parse(raw.get("top", 1), "search.evaluate.top"),
                           by=Choice(METRICS).parse(raw.get("by", metric), "search.evaluate.by"),
                           overrides=tuple(overrides))


def parse_search(raw: Any, base: RunSpec) -> GridSearch | OptunaSearch:
    if not isinstance(raw, Mapping):
        raise fail("search", "a mapping with kind: grid or kind: optuna", raw)
    kind = Choice(KINDS).parse(raw.get("kind"), "search.kind")
    _check_keys(raw, GRID_KEYS if kind == "grid" else OPTUNA_KEYS, "search")
    metric = _setting(raw, "metric")
    common: dict[str, Any] = {
        "metric": metric,
        "direction": _setting(raw, "direction"),
        "storage": Text(2000).parse(raw["storage"], "search.storage") if raw.get("storage") else None,
        "evaluate": _final_evaluation(raw.get("evaluate"), metric),
    }
    if kind == "grid":
        seeds = raw.get("seeds", [base.train.seed])
        if not isinstance(seeds, list) or not seeds:
            raise fail("search.seeds", "a non-empty list of ints", seeds)
        parsed_seeds = tuple(Int(0, 2**32 - 1).parse(s, f"search.seeds[{i}]") for i, s in enumerate(seeds))
        if len(set(parsed_seeds)) != len(parsed_seeds):
            raise SpecError(f"search.seeds: repeated seed in {show(seeds)}")
        stack = _setting(raw, "stack")
        grids = _grids(raw.get("params"))
        # max_points is not kept in GridSearch: a cap is no part of what a study runs (its fingerprint).
        _check_size(grids, len(parsed_seeds), _setting(raw, "max_points"))
        if not isinstance(raw.get("params"), list):
            return GridSearch(params=grids[0], seeds=parsed_seeds, stack=stack, **common)
        search = GridSearch(params=_grid_union(grids, base), seeds=parsed_seeds, stack=stack, grids=grids, **common)
        expand_grid(search, base)  # a point two grids share is refused here, before anything runs
        return search
    if "n_trials" not in raw:
        raise SpecError("search.n_trials: missing; an optuna search needs a number of trials")
    return OptunaSearch(
        params=_optuna_params(raw.get("params")),
        n_trials=Int(1, 100_000).parse(raw["n_trials"], "search.n_trials"),
        sampler=_setting(raw, "sampler"),
        pruner=_setting(raw, "pruner"),
        seed=_setting(raw, "seed"),
        **common,
    )


def expand_grid(search: GridSearch, base: RunSpec) -> list[Point]:
    """The cartesian product of the grid, repeated over seeds, in a fixed order:
    the first key varies slowest, seeds fastest. A union of grids is each grid's points in
    turn; every point names every key of the union (the base value where its grid does not
    sweep one), so all trials carry the same parameters."""
    union_keys = [key for key, _ in search.params]
    points: list[Point] = []
    seen: dict[str, int] = {}
    for g, grid in enumerate(search.parts):
        keys = [key for key, _ in grid]
        for combo in itertools.product(*(values for _, values in grid), search.seeds):
            chosen = dict(zip(keys, combo[:-1], strict=True))
            values = {k: chosen[k] if k in chosen else _base_value(base, k) for k in union_keys}
            values["train.seed"] = combo[-1]
            plain = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
            key = repr(sorted(plain.items()))
            if key in seen:
                raise SpecError(f"search.params[{g}]: repeats the point {_label(plain)} of "
                                f"search.params[{seen[key]}]; each point may appear in one grid only")
            seen[key] = g
            run = with_values(base, plain)
            check_run(run)  # a point may pair keys that do not go together (eval.disentanglement on mnist)
            points.append(Point(values=plain, run=run))
    return points


def _label(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items() if k != "train.seed")



def own_keys(search: GridSearch | OptunaSearch, base: RunSpec, values: dict[str, Any]) -> list[str]:
    """The swept keys that tell this point apart: all of them, but in a union of grids only those of the
    grid the point comes from (the others hold the base value there)."""
    keys = [key for key, _ in search.params]
    if not isinstance(search, GridSearch) or search.grids is None:
        return keys
    for grid in search.parts:
        mine = dict(grid)
        if all(repr(_plain(values.get(k))) in map(repr, map(_plain, mine[k])) for k in mine) and all(
                repr(_plain(values.get(k))) == repr(_plain(_base_value(base, k))) for k in keys if k not in mine):
            return [k for k in keys if k in mine]
    return keys


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
