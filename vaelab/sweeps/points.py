"""Sweep points <-> Optuna trial parameters: what a trial's parameters mean as a run."""

from __future__ import annotations

from typing import Any

from optuna.trial import Trial

from vaelab.search import GridSearch, Point
from vaelab.spec import Spec, with_values


def optuna_params(values: dict[str, Any]) -> dict[str, Any]:
    """A grid point's values as Optuna parameters: list values (model.hidden) travel as
    their repr, since Optuna's categorical choices must be scalars."""
    return {k: str(list(v)) if isinstance(v, (list, tuple)) else v for k, v in values.items()}


def _suggest_grid(trial: Trial, key: str, options: tuple[Any, ...]) -> Any:
    """The enqueued value of a grid key, back from its Optuna form."""
    if options and isinstance(options[0], tuple):
        chosen = trial.suggest_categorical(key, [str(list(o)) for o in options])
        return next(list(o) for o in options if str(list(o)) == chosen)
    return trial.suggest_categorical(key, list(options))


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


def child_run_name(number: int, values: dict[str, Any]) -> str:
    """e.g. `trial-3 beta=2 hidden=[64,32] seed=1`: readable in the MLflow run list."""
    parts = [f"{key.rsplit('.', 1)[-1]}={value}".replace(" ", "") for key, value in values.items()]
    return " ".join([f"trial-{number}", *parts])[:200]
