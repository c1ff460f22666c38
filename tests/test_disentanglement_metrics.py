"""The disentanglement metrics pinned on codes whose answer is known: the factors themselves, a rotation
of them, one latent carrying two factors, and noise; their invariances; and hand-computed small cases.

The data is a grid of four factors of sizes (3, 6, 8, 8) whose observations are the factor values
scaled to [-1, 1]; an encoder is a fixed map of those. Sample sizes are cut well below the defaults to
keep the file fast; each metric runs once per code (cached) and the tests read the cached scores.
"""

from __future__ import annotations

import functools
import math
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest

from vaelab.disentanglement import metrics as M

SIZES = np.array((3, 6, 8, 8))
CHANCE = 1 / len(SIZES)


class Grid:
    """Four independent uniform factors; the observation of a factor vector is its values in [-1, 1]."""

    factor_sizes = tuple(int(s) for s in SIZES)
    factor_names = ("shape", "scale", "x", "y")

    def sample_factors(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(SIZES, size=(n, len(SIZES)))

    def images(self, factors: np.ndarray) -> np.ndarray:
        return np.asarray(factors, dtype=float) / (SIZES - 1) * 2 - 1


def _random_rotation(d: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q * np.sign(np.diag(r))


ROTATION = _random_rotation(4, seed=0)
# Every latent an equal-weight mix of all four factors: the most mixing rotation.
HADAMARD = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]) / 2.0
PERMUTATION = np.array([2, 0, 3, 1])
SCALE, SHIFT = np.array([0.5, 3.0, 1.7, 0.25]), np.array([1.0, -2.0, 0.0, 5.0])


def _merged(x: np.ndarray) -> np.ndarray:
    """Latent 0 carries factors 0 and 1 together (6 * f0 + f1, 18 evenly spaced values); latents 1, 2
    are factors 2, 3."""
    f = np.rint((x + 1) / 2 * (SIZES - 1))
    return np.column_stack([6 * f[:, 0] + f[:, 1], x[:, 2], x[:, 3]])


def _noise() -> Callable[[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(123)
    return lambda x: rng.standard_normal((len(x), 4))


ENCODERS: dict[str, Callable[[], Callable[[np.ndarray], np.ndarray]]] = {
    "identity": lambda: lambda x: x,
    "rotation": lambda: lambda x: x @ ROTATION,
    "hadamard": lambda: lambda x: x @ HADAMARD,
    "merged": lambda: _merged,
    "noise": _noise,
    "rotation_permuted": lambda: lambda x: (x @ ROTATION)[:, PERMUTATION],
    "rotation_rescaled": lambda: lambda x: (x @ ROTATION) * SCALE + SHIFT,
}

SMALL = {
    "beta_vae": {"batch_size": 16, "num_train": 300, "num_eval": 300},
    "factor_vae": {"batch_size": 16, "num_train": 300, "num_eval": 300, "num_variance_estimate": 1000},
    "mig": {"num_train": 2000},
    "sap": {"num_train": 1000, "num_test": 500},
    "dci": {"num_train": 400, "num_test": 200},
    "modularity_explicitness": {"num_train": 1000, "num_test": 500},
}


@functools.cache
def score(metric: str, code: str) -> dict[str, float]:
    """The metric's scores of a code at the reduced sizes, from seed 0 (so every code sees the same factors);
    without standard errors: these tests check the formulas (tests/test_disentanglement_streams.py the SEs)."""
    return M.METRICS[metric](Grid(), ENCODERS[code](), np.random.default_rng(0), **SMALL[metric], se_resamples=0)


# ---- hand-computed small cases --------------------------------------------------------------------
def test_histogram_discretise_bins_each_latent_over_its_own_range():
    codes = np.array([[0.0, 10.0], [0.4, 30.0], [0.5, 20.0], [1.0, 40.0]])
    # latent 0: edges 0, .5, 1 -> [0, .5) is bin 1, [.5, 1] is bin 2; latent 1 the same over [10, 40]
    np.testing.assert_array_equal(M.histogram_discretise(codes, num_bins=2), [[1, 1], [1, 2], [2, 1], [2, 2]])


def test_mutual_information_and_entropy_by_hand():
    codes = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    factors = np.array([[0, 0], [0, 0], [1, 0], [1, 1]])
    h1 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # factor 1 is 0, 0, 0, 1
    np.testing.assert_allclose(M.discrete_entropy(factors), [math.log(2), h1])
    # I(z0; v0) = H(v0) (z0 = v0); z1 is independent of v0; I(z0; v1) = H(v1) - H(v1 | z0) = h1 - log(2) / 2,
    # and the same for z1, which splits v1 the same way.
    expected = [[math.log(2), h1 - math.log(2) / 2], [0.0, h1 - math.log(2) / 2]]
    np.testing.assert_allclose(M.mutual_information_matrix(codes, factors), expected, atol=1e-12)


def test_mig_gap_by_hand():
    mi = np.array([[0.9, 0.1, 0.0], [0.3, 0.5, 0.0], [0.0, 0.4, 0.0]])
    entropy = np.array([1.0, 0.5, 0.0])  # factor 2 never varies and is left out
    assert M.mig_from_mutual_information(mi, entropy) == pytest.approx(((0.9 - 0.3) / 1.0 + (0.5 - 0.4) / 0.5) / 2)
    assert M.mig_from_mutual_information(mi[:1], entropy) == pytest.approx((0.9 / 1.0 + 0.1 / 0.5) / 2)


def test_dci_from_importance_by_hand():
    assert M.dci_from_importance(np.eye(3)) == pytest.approx({"disentanglement": 1.0, "completeness": 1.0})
    # code 0 matters equally for factors 0, 1 (1 - log 2 / log 4 = 1/2, weight 1/2); codes 1, 2 for one each
    merged = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    assert M.dci_from_importance(merged) == pytest.approx({"disentanglement": 0.75, "completeness": 1.0})
    even = M.dci_from_importance(np.ones((4, 4)))
    assert even == pytest.approx({"disentanglement": 0.0, "completeness": 0.0}, abs=1e-9)
    # an unused code takes no weight
    padded = M.dci_from_importance(np.vstack([np.eye(2), np.zeros(2)]))
    assert padded["disentanglement"] == pytest.approx(1.0)


def test_modularity_and_sap_by_hand():
    # code 0 all about factor 0; code 1 says 0.5 about factor 0 and 1 about factor 1: 1 - 0.25 / (2 * 1);
    # code 2 says nothing and scores 0
    mi = np.array([[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert M.modularity_from_mutual_information(mi) == pytest.approx((1.0 + (1 - 0.25 / 2) + 0.0) / 3)
    s = np.array([[0.9, 0.2], [0.4, 0.6], [0.1, 0.5]])
    assert M.sap_from_score_matrix(s) == pytest.approx(((0.9 - 0.4) + (0.6 - 0.5)) / 2)


# ---- the factors themselves: near perfect ---------------------------------------------------------
def test_the_factors_themselves_score_near_perfect():
    assert score("beta_vae", "identity")["eval_accuracy"] >= 0.98
    assert score("factor_vae", "identity")["eval_accuracy"] == 1.0  # the fixed factor's latent has variance 0
    assert score("mig", "identity")["discrete_mig"] >= 0.97
    dci = score("dci", "identity")
    assert dci["disentanglement"] >= 0.97 and dci["completeness"] >= 0.97 and dci["informativeness_test"] >= 0.97
    me = score("modularity_explicitness", "identity")
    assert me["modularity_score"] >= 0.98 and me["explicitness_score_test"] >= 0.97


def test_sap_rewards_the_factors_but_a_one_latent_linear_svm_cannot_reach_one():
    identity, noise = score("sap", "identity")["sap_score"], score("sap", "noise")["sap_score"]
    assert 0.15 < identity < 0.6  # middle values of an 8-valued factor are not linearly separable on one axis
    assert identity > noise + 0.1


# ---- rotations ------------------------------------------------------------------------------------
def test_random_rotation_drops_mig_dci_and_sap_but_not_the_beta_vae_score():
    assert np.abs(ROTATION).max() < 0.95  # no latent is a factor
    # MIG and DCI ask for axis alignment (Chen et al. 2018; Eastwood & Williams 2018)
    assert score("mig", "rotation")["discrete_mig"] < score("mig", "identity")["discrete_mig"] - 0.4
    assert score("dci", "rotation")["disentanglement"] < 0.5
    assert score("dci", "rotation")["completeness"] < 0.5
    assert score("sap", "rotation")["sap_score"] < score("sap", "identity")["sap_score"] - 0.05
    # a linear classifier reads a rotated code (the failure Kim & Mnih 2018 and Chen et al. 2018 point out)
    assert score("beta_vae", "rotation")["eval_accuracy"] >= 0.95
    # explicitness asks for linear decodability, which a rotation keeps; modularity for one factor per latent
    me, base = score("modularity_explicitness", "rotation"), score("modularity_explicitness", "identity")
    assert me["explicitness_score_test"] == pytest.approx(base["explicitness_score_test"], abs=0.02)
    assert me["modularity_score"] < base["modularity_score"] - 0.02


def test_an_evenly_mixing_rotation_leaves_only_explicitness():
    assert score("mig", "hadamard")["discrete_mig"] < 0.05
    assert score("sap", "hadamard")["sap_score"] < 0.05
    assert score("factor_vae", "hadamard")["eval_accuracy"] < CHANCE + 0.1  # all latents lose the same variance
    me = score("modularity_explicitness", "hadamard")
    assert me["modularity_score"] < 0.5
    assert me["explicitness_score_test"] >= 0.97


# ---- one latent carrying two factors --------------------------------------------------------------
def test_one_latent_carrying_two_factors():
    # DCI: that latent's importance is split evenly over 2 of 4 factors -> D = 1/2 * 1/2 + 1/4 + 1/4;
    # each factor is still read from one latent -> C = 1
    dci = score("dci", "merged")
    assert dci["disentanglement"] == pytest.approx(0.75, abs=0.03)
    assert dci["completeness"] >= 0.97
    # MIG does not penalise it: each factor still has one informative latent
    assert score("mig", "merged")["discrete_mig"] >= 0.95
    # FactorVAE: a latent maps to one factor, so the votes for the other of the two are lost (1 - 1/4)
    assert score("factor_vae", "merged")["eval_accuracy"] == pytest.approx(0.75, abs=0.05)
    # modularity of the shared latent: 1 - I(z; v0)^2 / (3 I(z; v1)^2), I = H: log 3 and log 6; the others 1
    expected = (1 - (math.log(3) / math.log(6)) ** 2 / 3 + 2) / 3
    assert score("modularity_explicitness", "merged")["modularity_score"] == pytest.approx(expected, abs=0.01)


# ---- noise ----------------------------------------------------------------------------------------
def test_noise_scores_chance_or_zero():
    assert score("beta_vae", "noise")["eval_accuracy"] == pytest.approx(CHANCE, abs=0.1)
    assert score("factor_vae", "noise")["eval_accuracy"] == pytest.approx(CHANCE, abs=0.1)
    assert score("mig", "noise")["discrete_mig"] < 0.02
    assert score("sap", "noise")["sap_score"] < 0.05
    dci = score("dci", "noise")
    assert dci["disentanglement"] < 0.1
    chance = float(np.mean(1 / SIZES))
    assert dci["informativeness_test"] == pytest.approx(chance, abs=0.1)
    assert score("modularity_explicitness", "noise")["explicitness_score_test"] == pytest.approx(0.5, abs=0.05)


# ---- invariances ----------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", list(SMALL))
def test_permuting_latents_changes_nothing(metric):
    # lbfgs sums the features in another order; a tree splitter that finds two latents splitting a node
    # equally well takes the first it meets, and it meets them in another order
    tolerance = {"beta_vae": 0.01, "dci": 0.02}.get(metric, 1e-6)
    assert score(metric, "rotation_permuted") == pytest.approx(score(metric, "rotation"), abs=tolerance)


@pytest.mark.parametrize("metric", ["factor_vae", "mig", "modularity_explicitness"])
def test_affine_maps_of_latents_change_nothing_where_the_metric_normalises(metric):
    # FactorVAE divides by each latent's spread; MIG and modularity bin each latent over its own range;
    # explicitness standardises the latents
    assert score(metric, "rotation_rescaled") == pytest.approx(score(metric, "rotation"), abs=1e-6)


def test_continuous_sap_is_invariant_to_rescaling():
    kwargs = {"num_train": 1000, "num_test": 10, "continuous_factors": True}
    plain = M.sap_score(Grid(), ENCODERS["rotation"](), np.random.default_rng(0), **kwargs)
    scaled = M.sap_score(Grid(), ENCODERS["rotation_rescaled"](), np.random.default_rng(0), **kwargs)
    assert plain == pytest.approx(scaled, abs=1e-9)
    assert plain["sap_score"] > 0.05


def test_factor_vae_prunes_collapsed_latents():
    def with_collapsed(x: np.ndarray) -> np.ndarray:
        return np.column_stack([x, np.full(len(x), 3.0), 0.01 * x[:, 0]])  # std 0, and 0.01 * 0.8 < 0.05

    r = M.factor_vae_score(Grid(), with_collapsed, np.random.default_rng(0), **SMALL["factor_vae"])
    assert r["num_active_dims"] == 4.0 and r["eval_accuracy"] == 1.0
    everything = M.factor_vae_score(Grid(), with_collapsed, np.random.default_rng(0), **SMALL["factor_vae"],
                                    prune_threshold=10.0)
    assert everything == {"train_accuracy": 0.0, "eval_accuracy": 0.0, "num_active_dims": 0.0}


def test_the_faster_random_forest_importance_agrees_on_the_known_cases():
    kwargs = {"num_train": 400, "num_test": 200, "importance": "random_forest"}
    identity = M.dci(Grid(), ENCODERS["identity"](), np.random.default_rng(0), **kwargs)
    merged = M.dci(Grid(), ENCODERS["merged"](), np.random.default_rng(0), **kwargs)
    assert identity["disentanglement"] >= 0.97 and identity["completeness"] >= 0.97
    assert merged["disentanglement"] == pytest.approx(0.75, abs=0.05)
    rotation = M.dci(Grid(), ENCODERS["rotation"](), np.random.default_rng(0), **kwargs)
    assert rotation["disentanglement"] < 0.5


# ---- same seed, same numbers; settings --------------------------------------------------------------
def test_a_seed_fixes_the_numbers_and_another_changes_them():
    encode = ENCODERS["rotation"]()
    first = M.mig(Grid(), encode, np.random.default_rng(0), num_train=500)
    assert first == M.mig(Grid(), encode, np.random.default_rng(0), num_train=500)
    assert first != M.mig(Grid(), encode, np.random.default_rng(1), num_train=500)


def test_defaults_are_disentanglement_libs():
    # config/unsupervised_study_v1/metric_configs/*.gin
    expected = {
        "beta_vae": {"batch_size": 64, "num_train": 10_000, "num_eval": 5_000},
        "factor_vae": {"batch_size": 64, "num_train": 10_000, "num_eval": 5_000, "num_variance_estimate": 10_000,
                       "prune_threshold": 0.05},
        "mig": {"num_train": 10_000, "num_bins": 20},
        "sap": {"num_train": 10_000, "num_test": 5_000, "continuous_factors": False},
        "dci": {"num_train": 10_000, "num_test": 5_000, "importance": "gbt"},
        "modularity_explicitness": {"num_train": 10_000, "num_test": 5_000, "num_bins": 20},
    }
    for metric, params in expected.items():
        settings = M.metric_settings(metric)
        assert {k: settings[k] for k in params} == params
        assert settings["estimator"] and settings["paper"]


def test_settings_take_overrides_and_refuse_unknown_ones():
    s = M.metric_settings("dci", num_train=400, importance="random_forest")
    assert s["num_train"] == 400 and s["num_test"] == 5_000 and "RandomForestClassifier(" in s["estimator"]
    assert s["images_encoded"] == 5_400
    assert M.metric_settings("beta_vae")["images_encoded"] == 2 * 64 * 15_000
    assert M.metric_settings("factor_vae")["images_encoded"] == 10_000 + 64 * 15_000
    with pytest.raises(TypeError, match="num_bins"):
        M.metric_settings("sap", num_bins=10)
    with pytest.raises(ValueError, match="unknown"):
        M.metric_settings("irs")
    with pytest.raises(ValueError, match="importance"):
        M.dci_importance_matrix(np.zeros((4, 1)), np.zeros((4, 1)), np.zeros((4, 1)), np.zeros((4, 1)), "lasso")


def test_an_encoder_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"\(n, D\)"):
        M.mig(Grid(), lambda x: x[:, 0], np.random.default_rng(0), num_train=10)


def test_metrics_module_imports_no_torch():
    code = "import sys, vaelab.disentanglement.metrics; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
