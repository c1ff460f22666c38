"""The Optuna sampler and pruner a search asks for. The names a spec may use are
checked by vaelab.search (without optuna); a test holds the two lists equal."""

from __future__ import annotations

from collections.abc import Callable

import optuna

from vaelab.search import GridSearch, OptunaSearch

SAMPLERS: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
    "cmaes": lambda seed: optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False),
    "qmc": lambda seed: optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False),
    "gp": lambda seed: optuna.samplers.GPSampler(seed=seed),
}

PRUNERS: dict[str, Callable[[], optuna.pruners.BasePruner]] = {
    "none": optuna.pruners.NopPruner,
    "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
    "hyperband": optuna.pruners.HyperbandPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
}


def sampler_for(search: OptunaSearch | GridSearch, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    if isinstance(search, GridSearch):
        return optuna.samplers.RandomSampler(seed=0)  # never consulted: every grid trial is enqueued
    # Workers that share a study need different seeds, or they propose the same points.
    return SAMPLERS[search.sampler]((search.seed + seed_offset) % 2**32)


def pruner_for(search: OptunaSearch | GridSearch) -> optuna.pruners.BasePruner:
    return PRUNERS[search.pruner if isinstance(search, OptunaSearch) else "none"]()
