from __future__ import annotations

from dataclasses import replace

import pytest

from vaelab.search import GridSearch, OptunaSearch, expand_grid
from vaelab.spec import SpecError, parse_spec


def spec(search: dict):
    return parse_spec({"name": "s", "base": {"train": {"seed": 7}}, "search": search})


def test_grid_expansion_is_deterministic_and_applies_values():
    parsed = spec({"kind": "grid", "params": {"loss.beta": [1, 4], "model.arch": ["mlp", "conv"]}, "seeds": [0, 1]})
    assert isinstance(parsed.search, GridSearch)
    points = expand_grid(parsed.search, parsed.base)
    assert len(points) == 8
    assert [p.values for p in points[:3]] == [
        {"loss.beta": 1.0, "model.arch": "mlp", "train.seed": 0},
        {"loss.beta": 1.0, "model.arch": "mlp", "train.seed": 1},
        {"loss.beta": 1.0, "model.arch": "conv", "train.seed": 0},
    ]
    assert points[-1].run.loss.beta == 4.0 and points[-1].run.model.arch == "conv" and points[-1].run.train.seed == 1
    assert len({p.run.hash() for p in points}) == 8
    assert [p.values for p in expand_grid(parsed.search, parsed.base)] == [p.values for p in points]


def test_grid_without_seeds_uses_the_base_seed_and_lists_work():
    parsed = spec({"kind": "grid", "params": {"model.hidden": [[32], [64, 32]]}})
    points = expand_grid(parsed.search, parsed.base)
    assert [p.run.model.hidden for p in points] == [(32,), (64, 32)]
    assert {p.run.train.seed for p in points} == {7}


def test_optuna_space():
    parsed = spec({"kind": "optuna", "n_trials": 5, "sampler": "random", "pruner": "hyperband", "params": {
        "loss.beta": {"low": 0.1, "high": 10, "log": True},
        "model.z_dim": {"low": 2, "high": 32},
        "model.arch": {"choices": ["mlp", "conv"]}}})
    assert isinstance(parsed.search, OptunaSearch)
    kinds = {key: dist.kind for key, dist in parsed.search.params}
    assert kinds == {"loss.beta": "float", "model.z_dim": "int", "model.arch": "categorical"}


@pytest.mark.parametrize(
    ("search", "start"),
    [
        ({"params": {"loss.beta": [1]}}, "search.kind: expected one of grid, optuna"),
        ({"kind": "grid", "params": {"loss.betta": [1]}}, "search.params.loss.betta: not a searchable spec path"),
        ({"kind": "grid", "params": {"loss.beta": []}}, "search.params.loss.beta: expected a non-empty list"),
        ({"kind": "grid", "params": {"model.arch": ["mlp", "vit"]}}, "search.params.model.arch[1]: expected one of"),
        ({"kind": "grid", "params": {"loss.beta": [1, 1.0]}}, "search.params.loss.beta: repeated value"),
        ({"kind": "grid", "params": {"train.seed": [1, 2]}}, "search.params.train.seed: not a searchable"),
        ({"kind": "grid", "params": {}}, "search.params: expected a non-empty mapping"),
        ({"kind": "grid", "params": {"loss.beta": [1]}, "seeds": []}, "search.seeds: expected a non-empty list"),
        ({"kind": "grid", "params": {"loss.beta": [1]}, "n_trials": 3}, "search.n_trials: unknown key"),
        ({"kind": "grid", "params": {"loss.beta": [1]}, "metric": "test/elbo"}, "search.metric: expected one of"),
        ({"kind": "optuna", "params": {"loss.beta": {"low": 1, "high": 2}}}, "search.n_trials: missing"),
        ({"kind": "optuna", "n_trials": 2, "params": {"loss.beta": {"low": 3, "high": 2}}},
         "search.params.loss.beta: low (3.0) must not exceed high (2.0)"),
        ({"kind": "optuna", "n_trials": 2, "params": {"loss.beta": {"low": 0, "high": 2, "log": True}}},
         "search.params.loss.beta: log scale needs low > 0"),
        ({"kind": "optuna", "n_trials": 2, "params": {"model.z_dim": {"low": 0, "high": 2}}},
         "search.params.model.z_dim.low: expected int"),
        ({"kind": "optuna", "n_trials": 2, "params": {"model.arch": {"choices": []}}},
         "search.params.model.arch.choices: expected a non-empty list"),
        ({"kind": "optuna", "n_trials": 2, "params": {"model.hidden": {"choices": [[1]]}}},
         "search.params.model.hidden: list-valued keys can be searched in grids only"),
        ({"kind": "optuna", "n_trials": 2, "params": {"loss.beta": {"low": 1, "hi": 2}}},
         "search.params.loss.beta.hi: unknown key"),
        ({"kind": "optuna", "n_trials": 2, "sampler": "annealing", "params": {"loss.beta": {"low": 1, "high": 2}}},
         "search.sampler: expected one of tpe"),
    ],
)
def test_bad_searches_name_their_path(search, start):
    with pytest.raises(SpecError) as err:
        spec(search)
    assert str(err.value).startswith(start), str(err.value)


def test_search_names_are_the_samplers_and_pruners_the_sweep_builds():
    """search.py checks the names a spec may use, sweeps/samplers.py builds them: the lists must agree."""
    optuna = pytest.importorskip("optuna")
    from vaelab.search import PRUNERS, SAMPLERS
    from vaelab.sweeps import samplers

    assert set(samplers.SAMPLERS) == set(SAMPLERS)
    assert set(samplers.PRUNERS) == set(PRUNERS)
    search = spec({"kind": "optuna", "n_trials": 2, "params": {"loss.beta": {"low": 0.5, "high": 4.0}}}).search
    for name in SAMPLERS:
        assert isinstance(samplers.sampler_for(replace(search, sampler=name)), optuna.samplers.BaseSampler), name
    for name in PRUNERS:
        assert isinstance(samplers.pruner_for(replace(search, pruner=name)), optuna.pruners.BasePruner), name


def test_a_list_of_grids_is_their_union_each_over_its_own_keys():
    parsed = spec({"kind": "grid", "seeds": [0, 1], "params": [
        {"loss.objective": ["beta_vae", "beta_tcvae"], "loss.beta": [1, 4]},
        {"loss.objective": ["factorvae"], "loss.factor_gamma": [10, 40]},
    ]})
    search = parsed.search
    assert isinstance(search, GridSearch) and len(search.parts) == 2
    points = expand_grid(search, parsed.base)
    assert len(points) == (4 + 2) * 2
    # Every point names every key: the base value where its grid does not sweep one.
    assert points[0].values == {"loss.objective": "beta_vae", "loss.beta": 1.0, "loss.factor_gamma": 10.0,
                                "train.seed": 0}
    assert points[-1].values == {"loss.objective": "factorvae", "loss.beta": 1.0, "loss.factor_gamma": 40.0,
                                 "train.seed": 1}
    assert points[-1].run.loss.factor_gamma == 40.0 and points[-1].run.loss.objective == "factorvae"
    # The union's values per key are what Optuna's categorical parameters range over.
    assert dict(search.params) == {"loss.objective": ("beta_vae", "beta_tcvae", "factorvae"),
                                   "loss.beta": (1.0, 4.0), "loss.factor_gamma": (10.0, 40.0)}
    assert len({p.run.hash() for p in points}) == len(points)
    assert spec({"kind": "grid", "params": {"loss.beta": [1, 4]}}).search.grids is None  # one grid: as before


@pytest.mark.parametrize(("params", "start"), [
    ([], "search.params: expected a non-empty list of grids"),
    ([{"loss.beta": [1]}, 3], "search.params[1]: expected a non-empty mapping"),
    ([{"loss.beta": [1]}, {"loss.beta": ["x"]}], "search.params[1].loss.beta[0]:"),
    ([{"loss.beta": [1, 4]}, {"loss.beta": [4, 8]}], "search.params[1]: repeats the point loss.beta=4.0"),
])
def test_bad_grid_unions_name_their_path(params, start):
    with pytest.raises(SpecError) as err:
        spec({"kind": "grid", "params": params})
    assert str(err.value).startswith(start), str(err.value)


def test_a_union_mixing_a_list_value_with_a_null_base_round_trips_through_optuna():
    import optuna

    from vaelab.sweeps.points import optuna_params, suggest_values

    parsed = spec({"kind": "grid", "params": [{"model.arch": ["mlp"], "model.hidden": [[64], [128, 64]]},
                                              {"model.arch": ["conv"], "model.channels": [[8, 16]]}]})
    study = optuna.create_study()
    points = expand_grid(parsed.search, parsed.base)
    assert [p.values["model.channels"] for p in points] == [None, None, [8, 16]]
    for point in points:
        study.enqueue_trial(optuna_params(point.values))
        trial = study.ask()
        assert suggest_values(trial, parsed) == point.values
        study.tell(trial, 0.0)
