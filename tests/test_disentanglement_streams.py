"""Disentanglement numbers that say how sure they are: each metric family scores a draw of its own, a
run's draws follow its identity (recorded with the scores, reproducible), every headline score carries a
standard error that behaves like one, and the report names the MIG it shows.

Tiny grid data (tests.test_disentanglement_metrics.Grid), CPU, seconds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import mutual_info_score, roc_auc_score

from tests.conftest import tiny_run
from tests.test_disentanglement_metrics import ENCODERS, ROTATION, Grid
from vaelab.disentanglement import metrics as M
from vaelab.evaluation import disentanglement as D
from vaelab.evaluation.evaluators import EVALUATORS
from vaelab.evaluation.record import Facts
from vaelab.spec import with_values

EVALUATOR = EVALUATORS["disentanglement"]
HEADLINES = ("beta_vae", "factor_vae", "mig", "sap", "dci_disentanglement", "dci_completeness",
             "dci_informativeness", "modularity", "explicitness")


def _settings(run, share: float = 0.02) -> dict:
    """The evaluator's settings for `run` at `share` of the reference sizes, with DCI's fast estimator."""
    run = with_values(run, {"eval.dis_samples": share, "eval.dci_importance": "random_forest"})
    return EVALUATOR.settings(Facts(run, 1000, 100, run.train.epochs, True))


def _blurred():
    """A rotated code with noise of its own: no score is perfect, so none has a zero SE by construction."""
    rng = np.random.default_rng(11)
    return lambda x: x @ ROTATION + rng.standard_normal(x.shape)


def _run(**values):
    return with_values(tiny_run(Path("unused"), dataset="dsprites"), values)


class _Recording(Grid):
    """The grid, recording the factors each metric family samples, in order."""

    def __init__(self) -> None:
        self.family = ""
        self.drawn: dict[str, list[np.ndarray]] = {}

    def sample_factors(self, n: int, rng: np.random.Generator) -> np.ndarray:
        factors = super().sample_factors(n, rng)
        self.drawn.setdefault(self.family, []).append(factors.copy())
        return factors


def _scores_recording(monkeypatch: pytest.MonkeyPatch, settings: dict) -> tuple[dict, _Recording]:
    data = _Recording()
    for name, fn in list(M.METRICS.items()):
        def tagged(*args, _name=name, _fn=fn, **kwargs):
            data.family = _name
            return _fn(*args, **kwargs)
        monkeypatch.setitem(M.METRICS, name, tagged)
    return D.scores(ENCODERS["rotation"](), data, settings), data


# ---- one stream per family -------------------------------------------------------------------------
def test_no_two_metric_families_score_the_same_draw(monkeypatch: pytest.MonkeyPatch):
    scores, data = _scores_recording(monkeypatch, _settings(_run()))
    assert set(data.drawn) == set(M.METRICS)
    firsts = {family: draws[0] for family, draws in data.drawn.items()}
    # MIG's codes were SAP's training codes and DCI's first codes (one generator restarted per family)
    for a in firsts:
        for b in firsts:
            rows = min(len(firsts[a]), len(firsts[b]))
            if a < b:
                assert not np.array_equal(firsts[a][:rows], firsts[b][:rows]), (a, b)
    assert all(math.isfinite(v) for v in scores.values())


def test_a_family_draws_the_same_whatever_the_others_do():
    # Name-keyed streams: a family's draw depends on the run's seed and its own name only.
    first = M.metric_rng(7, "mig").integers(1000, size=20)
    assert np.array_equal(first, M.metric_rng(7, "mig").integers(1000, size=20))
    assert not np.array_equal(first, M.metric_rng(7, "sap").integers(1000, size=20))
    assert not np.array_equal(first, M.metric_rng(8, "mig").integers(1000, size=20))


# ---- draws that follow the run ---------------------------------------------------------------------
def test_runs_of_one_seed_but_another_identity_are_scored_on_other_draws():
    base, other = _run(), _run(**{"loss.beta": 4.0})
    assert base.train.seed == other.train.seed
    assert _settings(base)["seed"] != _settings(other)["seed"]
    assert _settings(base)["seed"] != _settings(_run(**{"train.seed": 1}))["seed"]
    mine, theirs = (D.scores(ENCODERS["rotation"](), Grid(), _settings(r)) for r in (base, other))
    assert mine["test/dis/mig"] != theirs["test/dis/mig"]  # the same code, other factors drawn


def test_the_seed_is_recorded_and_a_later_evaluation_of_the_run_draws_the_same():
    from vaelab.evaluation.later import with_eval_overrides

    run = _run()
    settings = _settings(run)
    assert settings["seed"] == D.draw_seed(run) and "run_hash" in settings["seed_from"]
    assert "SeedSequence" in settings["streams"] and settings["codes"] == "posterior means"
    # `vaelab evaluate` changes eval.* only (the reference sizes, every IWAE image): the same draws
    assert D.draw_seed(with_eval_overrides(run, ["eval.dis_samples=0.5"])) == D.draw_seed(run)
    json.dumps(settings)  # logged as a tag


def test_the_same_run_evaluated_twice_gives_the_same_numbers():
    settings = _settings(_run())
    first = D.scores(ENCODERS["rotation"](), Grid(), settings)
    assert first == D.scores(ENCODERS["rotation"](), Grid(), settings)
    assert {f"test/dis/{name}_se" for name in HEADLINES} <= set(first)


# ---- standard errors ---------------------------------------------------------------------------------
def test_every_headline_score_has_a_positive_se_that_shrinks_with_the_samples():
    small, large = (D.scores(_blurred(), Grid(), _settings(_run(), share)) for share in (0.02, 0.32))
    for name in HEADLINES:
        key = f"test/dis/{name}_se"
        assert small[key] > 0 and large[key] > 0, name
        # 16 times the samples: about a quarter of the SE (DCI's parts give a rough SE: 4 degrees of freedom)
        assert large[key] < small[key] / 2, (name, small[key], large[key])
    method = _settings(_run())["metrics"]
    assert all(s["se_method"] and s["se_resamples"] == M.SE_RESAMPLES for s in method.values())
    assert "disjoint parts" in method["dci"]["se_method"] and "bootstrap" in method["mig"]["se_method"]


def test_an_accuracys_se_is_the_binomial_one():
    # Noise codes: the FactorVAE and BetaVAE accuracies are near chance; their evaluation points are
    # independent, so the bootstrap SE is sqrt(p (1 - p) / n) up to its Monte-Carlo error (1.6% at 2000).
    noise = ENCODERS["noise"]()
    for fn, sizes, n in ((M.factor_vae_score, {"batch_size": 8, "num_train": 200, "num_eval": 400,
                                               "num_variance_estimate": 500}, 400),
                         (M.beta_vae_score, {"batch_size": 8, "num_train": 200, "num_eval": 400}, 400)):
        out = fn(Grid(), noise, np.random.default_rng(0), **sizes, se_resamples=2000)
        p = out["eval_accuracy"]
        assert out["eval_accuracy_se"] == pytest.approx(math.sqrt(p * (1 - p) / n), rel=0.06), fn.__name__


def test_the_bootstrap_se_of_a_mean_is_its_textbook_se():
    values = np.random.default_rng(3).standard_normal(500)
    se = M.bootstrap_se(lambda i: float(values[i].mean()), len(values), np.random.default_rng(4), 4000)
    assert se == pytest.approx(values.std() / math.sqrt(len(values)), rel=0.05)


def test_the_se_leaves_the_scores_as_they_were_and_can_be_turned_off():
    kwargs = {"num_train": 400, "num_test": 200}
    on = M.modularity_explicitness(Grid(), ENCODERS["rotation"](), np.random.default_rng(0), **kwargs)
    off = M.modularity_explicitness(Grid(), ENCODERS["rotation"](), np.random.default_rng(0), **kwargs,
                                    se_resamples=0)
    assert {k: v for k, v in on.items() if not k.endswith("_se")} == off
    assert M.metric_settings("mig", se_resamples=0)["se_method"].startswith("none")


def test_the_faster_mutual_information_and_auc_are_sklearns():
    rng = np.random.default_rng(5)
    for _ in range(20):
        n = int(rng.integers(2, 800))
        codes, factors = rng.integers(1, 21, size=(n, 3)), rng.integers(0, 9, size=(n, 2)) * 5 - 2
        expected = [[mutual_info_score(factors[:, f], codes[:, d]) for f in range(2)] for d in range(3)]
        assert np.array_equal(M.mutual_information_matrix(codes, factors), expected)
        assert np.array_equal(M.discrete_entropy(factors), [mutual_info_score(v, v) for v in factors.T])
    proba = np.round(rng.random((300, 4)), 1)  # ties, as probabilities have
    y = rng.integers(0, 4, 300)
    expected = np.mean([roc_auc_score(y == c, proba[:, c]) for c in range(4)])
    assert M._mean_auc_by_ranks(proba, np.arange(4), y) == pytest.approx(expected, abs=1e-12)


# ---- the report names the MIG it shows ----------------------------------------------------------------
def test_the_report_names_the_mig_variant_and_keeps_the_ses_out_of_its_tables(tmp_path: Path):
    from vaelab.report import StudyRuns, build_report

    rows = []
    for beta in (1, 4):
        for seed in (0, 1):
            scores = {f"metrics.test/dis/{name}": 0.1 * beta + 0.01 * seed for name in HEADLINES}
            ses = {f"metrics.test/dis/{name}_se": 0.003 for name in HEADLINES}
            rows.append({"params.loss.beta": str(beta), "params.train.seed": str(seed), **scores, **ses,
                         "metrics.test/elbo": 100.0 + beta, "run_id": f"r{beta}{seed}", "status": "FINISHED",
                         "start_time": 0, "end_time": 1000, "outcome": "finished"})
    study = StudyRuns("dis", "1", pd.DataFrame(rows), None, ["loss.beta"])
    text = build_report(study, tmp_path / "report").read_text()
    section = text.split("## Disentanglement")[1]
    for part in ("posterior means", "20 equal-width histogram bins", "H(v_k)", "disentanglement_lib"):
        assert part in section, part
    assert f"{M.NUM_BINS} equal-width" in D.MIG_VARIANT  # the words follow the metric's bins
    assert "test/dis/<score>_se" in section
    assert "s.e." not in text  # the SEs stay in MLflow, beside each run's scores
