"""Sweep points <-> Optuna trial parameters: what a trial's parameters mean as a run."""

from __future__ import annotations

from typing import Any

from optuna.trial import Trial

from vaelab.search import GridSearch, OptunaSearch, Point
from vaelab.spec import RunSpec, Spec, flatten, unused_keys, with_values


def optuna_params(values: dict[str, Any]) -> dict[str, Any]:
    """A grid point's values as Optuna parameters: list values (model.hidden) travel as
    their repr, since Optuna's categorical choices must be scalars."""
    return {k: str(list(v)) if isinstance(v, (list, tuple)) else v for k, v in values.items()}


def _as_choice(value: Any) -> Any:
    """One grid value as an Optuna categorical choice (a list travels as its repr; None and scalars as they are)."""
    return str(list(value)) if isinstance(value, (list, tuple)) else value


def _suggest_grid(trial: Trial, key: str, options: tuple[Any, ...]) -> Any:
    """The enqueued value of a grid key, back from its Optuna form. Each option is encoded on its own: a union
    of grids can mix a list value with a null (model.channels [32, 64] in one grid, the base's null in another)."""
    chosen = trial.suggest_categorical(key, [_as_choice(o) for o in options])
    picked = next(o for o in options if _as_choice(o) == chosen)
    return list(picked) if isinstance(picked, tuple) else picked


def suggest_values(trial: Trial, spec: Spec) -> dict[str, Any]:
    """The swept values of `trial`: a grid trial's enqueued point, or what the sampler proposes."""
    search = spec.search
    if search is None:
        raise ValueError("a sweep needs a search section")
    values: dict[str, Any] = {}
    if isinstance(search, GridSearch):
        for key, options in search.params:
            values[key] = _suggest_grid(trial, key, options)
        values["train.seed"] = trial.suggest_categorical("train.seed", list(search.seeds))
        return values
    for key, dist in search.params:
        if dist.kind == "categorical":
            values[key] = trial.suggest_categorical(key, list(dist.choices))
        elif dist.kind == "int":  # numeric distributions always have both bounds (vaelab.search)
            values[key] = trial.suggest_int(key, int(dist.low or 0), int(dist.high or 0), step=int(dist.step or 1),
                                            log=dist.log)
        else:
            values[key] = trial.suggest_float(key, float(dist.low or 0), float(dist.high or 0),
                                              step=None if dist.step is None else float(dist.step), log=dist.log)
    return values


def trial_point(trial: Trial, spec: Spec) -> Point:
    values = suggest_values(trial, spec)
    return Point(values=values, run=with_values(spec.base, values))


def child_run_name(number: int, values: dict[str, Any], keys: list[str] | None = None) -> str:
    """e.g. `beta=2 hidden=[64,32] seed=1 · trial 3`: the values that tell the run apart first (the MLflow
    run list cuts long names), then the trial. `keys` limits the values shown (a union's own grid)."""
    shown = [k for k in values if k != "train.seed" and (keys is None or k in keys)]
    parts = [f"{key.rsplit('.', 1)[-1]}={_short(values[key])}".replace(" ", "") for key in shown]
    if "train.seed" in values:
        parts.append(f"seed={values['train.seed']}")
    suffix = f" · trial {number}"
    return (" ".join(parts)[: 200 - len(suffix)] + suffix) if parts else suffix.strip(" ·")


def _short(value: Any) -> str:
    return str(list(value)) if isinstance(value, (list, tuple)) else str(value)


def search_values(search: GridSearch | OptunaSearch) -> str:
    """The search in one line with its values: `loss.beta=[0.5, 1.0] x 3 seeds`; a union's grids joined
    by `|`; Optuna's distributions with their bounds."""
    if isinstance(search, GridSearch):
        grids = " | ".join(", ".join(f"{k}={[_short(v) for v in values]}".replace("'", "") for k, values in grid)
                           for grid in search.parts)
        return f"{grids} x seeds {list(search.seeds)}"
    parts = []
    for key, dist in search.params:
        if dist.kind == "categorical":
            parts.append(f"{key} in {list(dist.choices)}")
        else:
            parts.append(f"{key} {dist.kind} [{dist.low}, {dist.high}]{' log' if dist.log else ''}")
    return "; ".join(parts) + f", {search.n_trials} trials"


def parent_params(spec: Spec, total: int, runs: list[RunSpec] | None = None) -> dict[str, Any]:
    """The sweep's parent run params: the search (its keys and values) and the base keys the runs share.
    Swept keys and the seed are left out of base.* (the grid overrides them), as are keys no run uses
    (of `runs`, a grid's points; else of the base)."""
    search = spec.search
    if search is None:
        raise ValueError("a sweep needs a search section")
    swept = {key for key, _ in search.params} | {"train.seed"}
    unused = set.intersection(*(unused_keys(r) for r in runs or [spec.base]))
    params: dict[str, Any] = {f"base.{k}": v for k, v in flatten(spec.base).items() if k not in swept | unused}
    params.update({"search.kind": search.kind, "search.total": total, "search.metric": search.metric,
                   "search.direction": search.direction, "search.params": ", ".join(k for k, _ in search.params),
                   "search.values": search_values(search)[:6000]})
    return params
