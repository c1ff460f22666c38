"""Supervised disentanglement metrics as pure functions of a factor dataset, an encoder and a seed.

Each metric samples ground-truth factors, renders observations for them, encodes those to latent
means and scores the codes against the factors. Sample sizes, discretisation and estimators follow
google-research/disentanglement_lib (disentanglement_lib/evaluation/metrics/*.py, with the defaults of
its metric gin configs, config/unsupervised_study_v1/metric_configs/*.gin, the study of Locatello et
al. 2019). Where this module departs from it, the docstring says so. All randomness comes from the
`rng` passed in (and from the encoder, if it has its own): `metric_rng` gives each metric family its own
stream of a run's seed, so no two families score the same draw. numpy, scipy and scikit-learn only.

Each headline score comes with a standard error, `<score>_se`, from the samples the metric already drew
and encoded (no image is rendered or encoded for it): a bootstrap over its points (Efron & Tibshirani
1993, "An introduction to the bootstrap", ch. 6) where the score is a function of them, the fitted
classifiers held fixed; for DCI's disentanglement and completeness, which come from the fitted
importances alone, the spread over disjoint parts of its training draw, each fitted once. `se_method`
says which, per metric; `se_resamples=0` turns them off. Against the spread over 25 independent draws
(a noisy rotated code of a toy grid; 1000 training, 500 test points) the mean SE came within 10% for
MIG, SAP, BetaVAE, DCI informativeness and explicitness; it was 0.65-0.8 of it for DCI disentanglement
and completeness (the parts' 4 degrees of freedom, their smaller size) and 1.7 times it for modularity
(a resample's repeated points add spurious mutual information): read those two as rough.

Shapes: codes are (n, D) latent means, factors are (n, F) integer factor values, and matrices
relating the two are (D, F). Mutual information and entropy are in nats.
"""

from __future__ import annotations

import inspect
import math
import os
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray
from scipy.stats import rankdata
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.svm import LinearSVC

Floats = NDArray[np.float64]
Ints = NDArray[np.int64]


class FactorData(Protocol):
    """Ground-truth factors of variation, and the observations they render to."""

    factor_sizes: tuple[int, ...]  # e.g. dSprites (3, 6, 40, 32, 32)
    factor_names: tuple[str, ...]

    def sample_factors(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n, F) integer factor values, factor f in range(factor_sizes[f])."""
        ...

    def images(self, factors: np.ndarray) -> np.ndarray:
        """Observations for (n, F) factors: any array whose first axis is n that the encoder takes."""
        ...


Encode = Callable[[np.ndarray], np.ndarray]  # observations -> (n, D) latent means

# Observations are rendered and encoded this many at a time. The reference encodes 16 or 64 at a
# time; the chunk changes memory and speed, not the numbers.
ENCODE_CHUNK = 1024
# Per-latent histogram bins (config/*/metric_configs/mig.gin, modularity_explicitness.gin).
NUM_BINS = 20
# FactorVAE: latents whose standard deviation over the data is below this are pruned as collapsed
# (prune_dims.threshold in config/unsupervised_study_v1/metric_configs/factor_vae_metric.gin).
PRUNE_THRESHOLD = 0.05
# SAP's classifier (sap_score.py compute_score_matrix).
SAP_SVC_C = 0.01
# DCI's importance estimators: "gbt" is the reference's (dci.py compute_importance_gbt);
# "random_forest" is a faster one this module offers (see `dci`), with these settings.
DCI_IMPORTANCE = ("gbt", "random_forest")
FOREST = {"n_estimators": 50, "max_depth": 8, "max_features": None}
# Resamples behind each bootstrap standard error: the SE's own Monte-Carlo error is about 1/sqrt(2 B) of
# it (7% at 100; Efron & Tibshirani 1993, ch. 6).
SE_RESAMPLES = 100
# DCI's disentanglement and completeness need a refit per replicate (minutes for gbt at the reference
# sizes): their SE is from this many disjoint parts of the training draw, fitted once each (about one
# more fit in all, the parts being smaller), SE = std over the parts / sqrt(parts).
SE_PARTS = 5


# ---- sampling -------------------------------------------------------------------------------------
def _factors(data: FactorData, n: int, rng: np.random.Generator) -> Ints:
    factors = np.array(data.sample_factors(n, rng), dtype=np.int64)  # a copy: batches are edited in place
    if factors.shape != (n, len(data.factor_sizes)):
        raise ValueError(f"sample_factors({n}) gave shape {factors.shape}, not ({n}, {len(data.factor_sizes)})")
    return factors


def _encode(data: FactorData, encode: Encode, factors: Ints) -> Floats:
    """(n, D) latent means for (n, F) factors, rendered and encoded ENCODE_CHUNK at a time."""
    parts = [np.asarray(encode(data.images(factors[i:i + ENCODE_CHUNK])), dtype=np.float64)
             for i in range(0, len(factors), ENCODE_CHUNK)]
    codes = np.concatenate(parts, axis=0)
    if codes.ndim != 2 or len(codes) != len(factors):
        raise ValueError(f"encode must give (n, D) latent means; got {codes.shape} for n={len(factors)}")
    return codes


def sample_codes(data: FactorData, encode: Encode, n: int, rng: np.random.Generator) -> tuple[Floats, Ints]:
    """n random factor draws and their codes: ((n, D) codes, (n, F) factors)."""
    factors = _factors(data, n, rng)
    return _encode(data, encode, factors), factors


def _seed(rng: np.random.Generator) -> int:
    """An integer seed for a scikit-learn estimator, drawn from rng."""
    return int(rng.integers(2**31 - 1))


def _chunks(num_points: int, images_per_point: int) -> Iterator[int]:
    """Sizes of consecutive groups of points whose images fill about one encoding chunk."""
    step = max(1, ENCODE_CHUNK // images_per_point)
    for start in range(0, num_points, step):
        yield min(step, num_points - start)


def metric_rng(seed: int, metric: str) -> np.random.Generator:
    """The stream of `metric`'s draws under a run's `seed`: numpy's SeedSequence(seed) with a spawn key
    from the metric's name (its CRC-32), so each family samples its own factors (no family's codes are
    another's), and adding a family leaves the others' draws as they were."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(zlib.crc32(metric.encode()),)))


# ---- standard errors ------------------------------------------------------------------------------
def bootstrap_se(statistic: Callable[[Ints], float], n: int, rng: np.random.Generator,
                 resamples: int = SE_RESAMPLES) -> float:
    """The bootstrap standard error of a statistic of n points (Efron & Tibshirani 1993, ch. 6): the
    standard deviation (ddof=1) of `statistic(indices)` over `resamples` draws of n indices with replacement.
    Resamples where the statistic is undefined (NaN: a class missing from a tiny resample) are left out;
    NaN with fewer than two left."""
    values = np.array([statistic(rng.integers(n, size=n)) for _ in range(resamples)], dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(np.std(values, ddof=1)) if len(values) >= 2 else math.nan


def _with_se(out: dict[str, float], key: str, statistic: Callable[[Ints], float], n: int,
             rng: np.random.Generator, resamples: int) -> dict[str, float]:
    """`out` with `key`_se, the bootstrap SE of `statistic` over n points, unless resamples < 2 (off) or it
    is undefined."""
    if resamples >= 2 and n >= 2:
        se = bootstrap_se(statistic, n, rng, resamples)
        if math.isfinite(se):
            out[f"{key}_se"] = se
    return out


def _accuracy_se(out: dict[str, float], key: str, correct: np.ndarray, rng: np.random.Generator,
                 resamples: int) -> dict[str, float]:
    """`out` with the bootstrap SE of an accuracy over its evaluation points, the classifier held fixed
    (about sqrt(p (1 - p) / n), the binomial's). The points are taken in a fixed order (hits first), so
    that relabelling latents, which only reorders the points that hit, draws the same resamples."""
    hits = np.sort(np.asarray(correct, dtype=np.float64).ravel())[::-1]
    return _with_se(out, key, lambda i: float(hits[i].mean()), len(hits), rng, resamples)


# ---- BetaVAE score --------------------------------------------------------------------------------
def _beta_vae_points(data: FactorData, encode: Encode, rng: np.random.Generator, batch_size: int,
                     num_points: int) -> tuple[Floats, Ints]:
    """num_points (feature, label) pairs: the label is a factor k drawn uniformly; the feature is the
    mean over batch_size pairs of observations, that share factor k and nothing else by design, of |z1 - z2|."""
    num_factors = len(data.factor_sizes)
    features, labels = [], []
    for m in _chunks(num_points, 2 * batch_size):
        fixed = rng.integers(num_factors, size=m)
        pairs = _factors(data, 2 * m * batch_size, rng).reshape(2, m, batch_size, num_factors)
        first, second = pairs[0], pairs[1]
        rows = np.arange(m)
        second[rows, :, fixed] = first[rows, :, fixed]
        z = _encode(data, encode, pairs.reshape(-1, num_factors)).reshape(2, m, batch_size, -1)
        # Higgins et al. 2017: z_diff = 1/L sum_l |z1_l - z2_l| over the L = batch_size pairs
        features.append(np.abs(z[0] - z[1]).mean(axis=1))
        labels.append(fixed)
    return np.concatenate(features), np.concatenate(labels)


def beta_vae_score(data: FactorData, encode: Encode, rng: np.random.Generator, *, batch_size: int = 64,
                   num_train: int = 10_000, num_eval: int = 5_000,
                   se_resamples: int = SE_RESAMPLES) -> dict[str, float]:
    """BetaVAE metric (Higgins et al. 2017, "beta-VAE: Learning basic visual concepts with a
    constrained variational framework", ICLR): the accuracy of a linear classifier that predicts
    which factor a batch of observation pairs held fixed from the mean absolute code difference.

    Defaults (config/unsupervised_study_v1/metric_configs/beta_vae_sklearn.gin): batch_size=64 pairs
    per point, num_train=10000 points to fit the classifier, num_eval=5000 points to score it. The
    classifier is scikit-learn's LogisticRegression() with its defaults, as in beta_vae.py. Chance is
    1/F. A linear classifier can read a factor spread over several latents, so a rotated code can
    still score high: the metric does not ask for axis alignment.

    eval_accuracy_se: bootstrap over the num_eval points, the classifier held fixed.
    """
    x_train, y_train = _beta_vae_points(data, encode, rng, batch_size, num_train)
    model = LogisticRegression(random_state=_seed(rng)).fit(x_train, y_train)
    x_eval, y_eval = _beta_vae_points(data, encode, rng, batch_size, num_eval)
    correct = model.predict(x_eval) == y_eval
    out = {"train_accuracy": float(model.score(x_train, y_train)), "eval_accuracy": float(np.mean(correct))}
    return _accuracy_se(out, "eval_accuracy", correct, rng, se_resamples)


# ---- FactorVAE score ------------------------------------------------------------------------------
def _factor_vae_votes(data: FactorData, encode: Encode, rng: np.random.Generator, batch_size: int,
                      num_points: int, global_var: Floats, active: NDArray[np.bool_]) -> Ints:
    """(F, D) votes: for each of num_points batches with one factor k fixed, a vote (k, d) for the
    active latent d whose variance over the batch, divided by its variance over the data, is least."""
    num_factors = len(data.factor_sizes)
    dims = np.flatnonzero(active)
    votes = np.zeros((num_factors, len(global_var)), dtype=np.int64)
    for m in _chunks(num_points, batch_size):
        fixed = rng.integers(num_factors, size=m)
        factors = _factors(data, m * batch_size, rng).reshape(m, batch_size, num_factors)
        rows = np.arange(m)
        factors[rows, :, fixed] = factors[rows, 0, fixed][:, None]
        z = _encode(data, encode, factors.reshape(-1, num_factors)).reshape(m, batch_size, -1)
        # Kim & Mnih 2018: argmin_d Var_batch(z_d / s_d), s_d the std of z_d over the whole data
        ratio = z[:, :, dims].var(axis=1, ddof=1) / global_var[dims]
        np.add.at(votes, (fixed, dims[np.argmin(ratio, axis=1)]), 1)
    return votes


def factor_vae_score(data: FactorData, encode: Encode, rng: np.random.Generator, *, batch_size: int = 64,
                     num_train: int = 10_000, num_eval: int = 5_000, num_variance_estimate: int = 10_000,
                     prune_threshold: float = PRUNE_THRESHOLD, se_resamples: int = SE_RESAMPLES) -> dict[str, float]:
    """FactorVAE metric (Kim & Mnih 2018, "Disentangling by factorising", ICML): fix one factor over a
    batch, normalise each latent by its standard deviation over the data, and vote the latent of least
    variance for that factor; a majority-vote classifier (each latent -> the factor it got most votes
    for) is scored on fresh votes.

    Defaults (config/unsupervised_study_v1/metric_configs/factor_vae_metric.gin): batch_size=64,
    num_train=10000 and num_eval=5000 votes, num_variance_estimate=10000 observations for the global
    variances, prune_threshold=0.05: latents whose global standard deviation is below it (in the
    latent's own units, not relative) are collapsed and take no votes. Chance is 1/F. The
    normalisation makes the score invariant to rescaling latents (as long as pruning is unchanged).

    num_active_dims is the number of latents kept; the reference reports the length of its mask
    (always D) under that name. eval_accuracy_se: bootstrap over the num_eval votes, the majority-vote
    classifier held fixed; none where no latent is active (the score is 0 by construction).
    """
    codes, _ = sample_codes(data, encode, num_variance_estimate, rng)
    global_var = codes.var(axis=0, ddof=1)
    active = np.sqrt(global_var) >= prune_threshold
    if not active.any():
        return {"train_accuracy": 0.0, "eval_accuracy": 0.0, "num_active_dims": 0.0}
    train = _factor_vae_votes(data, encode, rng, batch_size, num_train, global_var, active)
    classifier = np.argmax(train, axis=0)  # latent -> factor
    held_out = _factor_vae_votes(data, encode, rng, batch_size, num_eval, global_var, active)
    dims = np.arange(train.shape[1])
    hits, votes = int(held_out[classifier, dims].sum()), int(held_out.sum())
    out = {"train_accuracy": float(train[classifier, dims].sum() / train.sum()), "eval_accuracy": hits / votes,
           "num_active_dims": float(active.sum())}
    return _accuracy_se(out, "eval_accuracy", np.arange(votes) < hits, rng, se_resamples)


# ---- discrete mutual information ------------------------------------------------------------------
def histogram_discretise(codes: np.ndarray, num_bins: int = NUM_BINS) -> Ints:
    """Each latent into num_bins equal-width bins over its own observed range, labelled 1..num_bins
    (the reference's histogram_discretizer in utils.py). Affine maps of a latent leave it unchanged."""
    codes = np.asarray(codes, dtype=np.float64)
    out = np.empty(codes.shape, dtype=np.int64)
    for d in range(codes.shape[1]):
        edges = np.histogram_bin_edges(codes[:, d], bins=num_bins)
        out[:, d] = np.digitize(codes[:, d], edges[:-1])
    return out


def _labels(values: np.ndarray) -> tuple[Ints, int]:
    """Values as labels 0..k-1 in sorted order, and k."""
    uniques, labels = np.unique(values, return_inverse=True)
    return labels.ravel().astype(np.int64), len(uniques)


def _plug_in_mi(rows: tuple[Ints, int], cols: tuple[Ints, int]) -> float:
    """Plug-in mutual information in nats of two labellings (from `_labels`): sklearn's mutual_info_score
    term for term (the reference's estimator, utils.py discrete_mutual_info), from one bincount of the
    joint instead of a sparse contingency table, which is what makes the bootstrap affordable."""
    (x, kx), (y, ky) = rows, cols
    if kx == 1 or ky == 1:
        return 0.0  # one value carries no information
    joint = np.bincount(x * ky + y, minlength=kx * ky).reshape(kx, ky)
    nzx, nzy = np.nonzero(joint)
    counts, n = joint[nzx, nzy], len(x)
    pi, pj = joint.sum(axis=1), joint.sum(axis=0)
    share = counts / n
    # sum_ij p_ij log(p_ij / (p_i p_j)), in sklearn's order of operations
    terms = share * (np.log(counts) - np.log(n)) + share * (-np.log(pi[nzx] * pj[nzy]) + np.log(n) + np.log(n))
    terms = np.where(np.abs(terms) < np.finfo(np.float64).eps, 0.0, terms)
    return float(np.clip(terms.sum(), 0.0, None))


def mutual_information_matrix(codes_discrete: np.ndarray, factors: np.ndarray) -> Floats:
    """(D, F) plug-in mutual information I(z_d; v_f) in nats between discrete codes (n, D) and
    factors (n, F), from empirical joint frequencies (sklearn mutual_info_score's estimate, as utils.py)."""
    codes_discrete, factors = np.asarray(codes_discrete), np.asarray(factors)
    codes = [_labels(codes_discrete[:, d]) for d in range(codes_discrete.shape[1])]
    values = [_labels(factors[:, f]) for f in range(factors.shape[1])]
    return np.array([[_plug_in_mi(v, z) for v in values] for z in codes]).reshape(len(codes), len(values))


def discrete_entropy(factors: np.ndarray) -> Floats:
    """(F,) plug-in entropy H(v_f) in nats of each factor column, as I(v_f; v_f)."""
    factors = np.asarray(factors)
    values = [_labels(factors[:, f]) for f in range(factors.shape[1])]
    return np.array([_plug_in_mi(v, v) for v in values])


# ---- MIG ------------------------------------------------------------------------------------------
def mig_from_mutual_information(mi: np.ndarray, entropy: np.ndarray) -> float:
    """Mean over factors of the gap between the two latents most informative about it, over its entropy.

    A lone latent has a gap to zero. Factors that do not vary (entropy 0) are left out of the mean
    (the reference divides by zero); with none varying the gap is 0.
    """
    mi, entropy = np.asarray(mi, dtype=np.float64), np.asarray(entropy, dtype=np.float64)
    ranked = -np.sort(-mi, axis=0)
    second = ranked[1] if len(ranked) > 1 else np.zeros(mi.shape[1])
    varies = entropy > 0
    if not varies.any():
        return 0.0
    # Chen et al. 2018: MIG = 1/K sum_k (I(z_j(k); v_k) - max_{j != j(k)} I(z_j; v_k)) / H(v_k)
    return float(np.mean((ranked[0] - second)[varies] / entropy[varies]))


def mig_from_codes(codes: np.ndarray, factors: np.ndarray, num_bins: int = NUM_BINS) -> float:
    """Discrete MIG of (n, D) codes against (n, F) factors, latents in num_bins histogram bins."""
    mi = mutual_information_matrix(histogram_discretise(codes, num_bins), factors)
    return mig_from_mutual_information(mi, discrete_entropy(factors))


def mig(data: FactorData, encode: Encode, rng: np.random.Generator, *, num_train: int = 10_000,
        num_bins: int = NUM_BINS, se_resamples: int = SE_RESAMPLES) -> dict[str, float]:
    """Mutual information gap (Chen et al. 2018, "Isolating sources of disentanglement in variational
    autoencoders", NeurIPS), the discrete estimate of mig.py: codes in per-latent histogram bins,
    plug-in mutual information with each factor, gap between the top two latents over the factor's
    entropy, mean over factors. 1 for an axis-aligned code, about 0 for noise or a rotation; one
    latent carrying two factors is not penalised.

    Defaults (config/unsupervised_study_v1/metric_configs/mig.gin): num_train=10000 observations,
    num_bins=20. Invariant to permuting latents and to affine maps of each latent (the bins follow it).
    Implementations in the field differ (sampled codes instead of means, other bins, other estimators of I,
    other normalisers) and give numbers orders of magnitude apart on the same model; the report names this
    one (vaelab.evaluation.disentanglement.MIG_VARIANT).

    discrete_mig_se: bootstrap over the num_train codes, the whole estimate (bins, I, H) redone on each resample.
    """
    codes, factors = sample_codes(data, encode, num_train, rng)
    out = {"discrete_mig": mig_from_codes(codes, factors, num_bins)}
    return _with_se(out, "discrete_mig", lambda i: mig_from_codes(codes[i], factors[i], num_bins), num_train, rng,
                    se_resamples)


# ---- SAP ------------------------------------------------------------------------------------------
def _svc_hits(x_train: Floats, y_train: Ints, x_test: Floats, y_test: Ints, seed: int) -> NDArray[np.bool_]:
    model = LinearSVC(C=SAP_SVC_C, class_weight="balanced", random_state=seed).fit(x_train[:, None], y_train)
    return np.asarray(model.predict(x_test[:, None]) == y_test)


def _r_squared(x: Floats, y: Ints) -> float:
    cov = np.cov(x, y, ddof=1)
    if cov[0, 0] <= 1e-12 or cov[1, 1] <= 0:
        return 0.0
    return float(cov[0, 1] ** 2 / (cov[0, 0] * cov[1, 1]))


def _r_squared_matrix(codes: Floats, factors: Ints) -> Floats:
    return np.array([[_r_squared(codes[:, d], factors[:, f]) for f in range(factors.shape[1])]
                     for d in range(codes.shape[1])]).reshape(codes.shape[1], factors.shape[1])


def _sap_hits(codes_train: Floats, factors_train: Ints, codes_test: Floats, factors_test: Ints,
              seed: int) -> NDArray[np.bool_]:
    """(D, F, n_test): whether the linear SVM of latent d for factor f gets test point i right."""
    return np.array([[_svc_hits(codes_train[:, d], factors_train[:, f], codes_test[:, d], factors_test[:, f], seed)
                      for f in range(factors_train.shape[1])] for d in range(codes_train.shape[1])],
                    dtype=bool).reshape(codes_train.shape[1], factors_train.shape[1], len(codes_test))


def sap_score_matrix(codes_train: np.ndarray, factors_train: np.ndarray, codes_test: np.ndarray,
                     factors_test: np.ndarray, continuous_factors: bool = False, seed: int = 0) -> Floats:
    """(D, F) SAP scores: for discrete factors the test accuracy of a linear SVM (LinearSVC(C=0.01,
    class_weight="balanced"), one latent as the only input); for continuous factors the R^2 of a linear
    fit of the factor on the latent over the training codes (sap_score.py compute_score_matrix)."""
    codes_train, codes_test = np.asarray(codes_train, np.float64), np.asarray(codes_test, np.float64)
    factors_train, factors_test = np.asarray(factors_train), np.asarray(factors_test)
    if continuous_factors:
        return _r_squared_matrix(codes_train, factors_train)
    return _sap_hits(codes_train, factors_train, codes_test, factors_test, seed).mean(axis=2)


def sap_from_score_matrix(score: np.ndarray) -> float:
    """Mean over factors of the gap between the best and second-best latent's score (a lone latent: to 0)."""
    ranked = -np.sort(-np.asarray(score, dtype=np.float64), axis=0)
    second = ranked[1] if len(ranked) > 1 else np.zeros(ranked.shape[1])
    # Kumar et al. 2018: SAP = 1/K sum_k (S_{j(k) k} - max_{j != j(k)} S_{j k})
    return float(np.mean(ranked[0] - second))


def sap_score(data: FactorData, encode: Encode, rng: np.random.Generator, *, num_train: int = 10_000,
              num_test: int = 5_000, continuous_factors: bool = False,
              se_resamples: int = SE_RESAMPLES) -> dict[str, float]:
    """Separated attribute predictability (Kumar et al. 2018, "Variational inference of disentangled
    latent concepts from unlabeled observations", ICLR): how much better the best single latent predicts
    each factor than the second best, mean over factors. 0 for noise and for a factor shared evenly by
    two latents. A linear classifier on one latent cannot pick out a middle value of a factor, so even
    the factors themselves score well below 1 on factors of many values.

    Defaults (config/unsupervised_study_v1/metric_configs/sap_score.gin): num_train=10000 to fit,
    num_test=5000 to score, continuous_factors=False. The reference returns it as "SAP_score".

    sap_score_se: bootstrap over the num_test points, the SVMs held fixed; for continuous factors (R^2
    on the training codes, no classifier) over the num_train codes.
    """
    codes, factors = sample_codes(data, encode, num_train, rng)
    codes_test, factors_test = sample_codes(data, encode, num_test, rng)
    seed = _seed(rng)
    if continuous_factors:
        out = {"sap_score": sap_from_score_matrix(_r_squared_matrix(codes, factors))}
        return _with_se(out, "sap_score", lambda i: sap_from_score_matrix(_r_squared_matrix(codes[i], factors[i])),
                        num_train, rng, se_resamples)
    hits = _sap_hits(codes, factors, codes_test, factors_test, seed)
    out = {"sap_score": sap_from_score_matrix(hits.mean(axis=2))}
    return _with_se(out, "sap_score", lambda i: sap_from_score_matrix(hits[:, :, i].mean(axis=2)), num_test, rng,
                    se_resamples)


# ---- DCI ------------------------------------------------------------------------------------------
def _fit_importance(x_train: Floats, y_train: Ints, x_test: Floats, y_test: Ints, importance: str,
                    seed: int) -> tuple[Floats, float, NDArray[np.bool_]]:
    """(D,) importance of each latent for one factor, the predictor's train accuracy, and whether it gets
    each test point right."""
    model: GradientBoostingClassifier | RandomForestClassifier
    if importance == "gbt":
        model = GradientBoostingClassifier(random_state=seed)
    else:
        model = RandomForestClassifier(random_state=seed, **FOREST)
    model.fit(x_train, y_train)
    weights = np.abs(model.feature_importances_)
    return weights, float(model.score(x_train, y_train)), np.asarray(model.predict(x_test) == y_test)


def _dci_fits(codes_train: np.ndarray, factors_train: np.ndarray, codes_test: np.ndarray, factors_test: np.ndarray,
              importance: str, seed: int) -> tuple[Floats, Floats, NDArray[np.bool_]]:
    """(D, F) importances, (F,) train accuracies and (F, n_test) test hits of the per-factor predictors."""
    if importance not in DCI_IMPORTANCE:
        raise ValueError(f"importance must be one of {DCI_IMPORTANCE}, not {importance!r}")
    codes_train, codes_test = np.asarray(codes_train, np.float64), np.asarray(codes_test, np.float64)
    factors_train, factors_test = np.asarray(factors_train), np.asarray(factors_test)
    num_factors = factors_train.shape[1]
    matrix = np.zeros((codes_train.shape[1], num_factors))
    train_acc, test_hits = np.zeros(num_factors), np.zeros((num_factors, len(codes_test)), dtype=bool)
    # One predictor per factor, fitted side by side: scikit-learn's tree building releases the GIL, so
    # threads use every core; each fit has its own seed, so the numbers do not depend on the order.
    with ThreadPoolExecutor(max_workers=max(1, min(num_factors, os.cpu_count() or 1))) as pool:
        fits = list(pool.map(lambda f: _fit_importance(codes_train, factors_train[:, f], codes_test,
                                                       factors_test[:, f], importance, seed), range(num_factors)))
    for f, (weights, train, hits) in enumerate(fits):
        matrix[:, f], train_acc[f], test_hits[f] = weights, train, hits
    return matrix, train_acc, test_hits


def dci_importance_matrix(codes_train: np.ndarray, factors_train: np.ndarray, codes_test: np.ndarray,
                          factors_test: np.ndarray, importance: str = "gbt",
                          seed: int = 0) -> tuple[Floats, Floats, Floats]:
    """(D, F) importance of each latent for predicting each factor, and (F,) train and test accuracies
    of the per-factor predictors. See `dci` for the two importance estimators."""
    matrix, train_acc, test_hits = _dci_fits(codes_train, factors_train, codes_test, factors_test, importance, seed)
    return matrix, train_acc, test_hits.mean(axis=1)


def _dci_parts_se(codes: Floats, factors: Ints, importance: str, seed: int, parts: int) -> dict[str, float]:
    """SEs of disentanglement and completeness from `parts` disjoint parts of the training draw (independent
    draws of n / parts, the codes being drawn independently), importances fitted on each: the standard
    deviation over the parts / sqrt(parts), which takes the spread to shrink as 1 / sqrt(n) (the batch-means
    estimate). None where a part has a factor of one value (a classifier needs two) or parts < 2."""
    blocks = [b for b in np.array_split(np.arange(len(codes)), parts) if len(b)] if parts >= 2 else []
    if len(blocks) < 2 or any(len(np.unique(factors[b, f])) < 2 for b in blocks for f in range(factors.shape[1])):
        return {}
    # the importances are all a part gives: its test hits (on its first point) go unused
    scores = [dci_from_importance(_dci_fits(codes[b], factors[b], codes[b[:1]], factors[b[:1]], importance,
                                            seed)[0]) for b in blocks]
    return {f"{key}_se": float(np.std([s[key] for s in scores], ddof=1) / np.sqrt(len(scores)))
            for key in ("disentanglement", "completeness")}


def _normalised_entropy(weights: Floats) -> Floats:
    """Entropy of each row of non-negative weights taken as a distribution, over log(row length): 0 when
    one entry holds all the weight, 1 when spread evenly. As the reference, 1e-11 is added to each entry,
    so a row of zeros counts as even. Rows of length 1 have entropy 0."""
    if weights.shape[1] == 1:
        return np.zeros(len(weights))
    p = weights + 1e-11
    p = p / p.sum(axis=1, keepdims=True)
    return -(p * np.log(p)).sum(axis=1) / np.log(weights.shape[1])


def _weighted_concentration(weights: Floats) -> float:
    """1 - normalised entropy of each row, averaged with each row's share of the total weight."""
    total = weights.sum()
    share = weights.sum(axis=1) / total if total > 0 else np.full(len(weights), 1.0 / len(weights))
    return float(np.sum((1.0 - _normalised_entropy(weights)) * share))


def dci_from_importance(importance: np.ndarray) -> dict[str, float]:
    """Disentanglement and completeness of a (D, F) importance matrix R (dci.py):
    disentanglement = sum_d rho_d (1 - H_F(P_d.)), P_df = R_df / sum_k R_dk, rho_d = sum_f R_df / sum R;
    completeness = sum_f rho_f (1 - H_D(P_.f)), the same over columns (Eastwood & Williams 2018, Sec. 2)."""
    weights = np.abs(np.asarray(importance, dtype=np.float64))
    return {"disentanglement": _weighted_concentration(weights), "completeness": _weighted_concentration(weights.T)}


def dci(data: FactorData, encode: Encode, rng: np.random.Generator, *, num_train: int = 10_000,
        num_test: int = 5_000, importance: str = "gbt", se_resamples: int = SE_RESAMPLES,
        se_parts: int = SE_PARTS) -> dict[str, float]:
    """Disentanglement, completeness and informativeness (Eastwood & Williams 2018, "A framework for the
    quantitative evaluation of disentangled representations", ICLR), from the importance of each latent
    in a per-factor predictor. Disentanglement: each latent matters for one factor; completeness: each
    factor is read from one latent; informativeness: the predictors' accuracy (the reference reports
    accuracy, higher is better, under the paper's name for an error).

    Defaults (config/unsupervised_study_v1/metric_configs/dci.gin): num_train=10000 to fit,
    num_test=5000 to score. importance="gbt" is the reference: sklearn GradientBoostingClassifier()
    with its defaults (100 stages of depth-3 trees, one tree per class per stage) and its impurity
    importances. It is slow for factors of many values (dSprites: 113 classes in all, so about 11300
    trees on 10000 points; about 5 minutes on one core). importance="random_forest" is a faster option,
    not the reference (about 30 times faster there): RandomForestClassifier(n_estimators=50,
    max_depth=8, max_features=None) with its impurity importances. Eastwood & Williams used random
    forests; all latents are offered at every split, so that importance is not spread by feature
    subsampling. Its numbers differ from the reference's (dSprites-sized test: disentanglement 0.29
    against 0.24), so compare runs on one estimator only.

    SEs: informativeness_test_se by bootstrap over the num_test points, the predictors held fixed;
    disentanglement_se and completeness_se, which the fitted importances alone decide, from se_parts
    disjoint parts of the training codes fitted once each (see `_dci_parts_se`: about one more fit).
    """
    codes, factors = sample_codes(data, encode, num_train, rng)
    codes_test, factors_test = sample_codes(data, encode, num_test, rng)
    seed = _seed(rng)
    matrix, train_acc, hits = _dci_fits(codes, factors, codes_test, factors_test, importance, seed)
    out = {**dci_from_importance(matrix), "informativeness_train": float(np.mean(train_acc)),
           "informativeness_test": float(np.mean(hits.mean(axis=1)))}
    if se_resamples < 2:
        return out
    out.update(_dci_parts_se(codes, factors, importance, seed, se_parts))
    return _with_se(out, "informativeness_test", lambda i: float(np.mean(hits[:, i].mean(axis=1))), num_test, rng,
                    se_resamples)


# ---- modularity and explicitness ------------------------------------------------------------------
def modularity_from_mutual_information(mi: np.ndarray) -> float:
    """Mean over latents of 1 - delta, delta = sum_{f != f*} m_df^2 / ((F - 1) m_df*^2), f* the factor the
    latent says most about (modularity_explicitness.py). Latents that say nothing score 0."""
    squared = np.asarray(mi, dtype=np.float64) ** 2
    top = squared.max(axis=1)
    score = np.zeros(len(squared))
    says = top > 0
    if squared.shape[1] == 1:
        score[says] = 1.0
    else:
        # Ridgeway & Mozer 2018, Sec. 3: modularity_d = 1 - sum_{f != f*} m_df^2 / ((F - 1) m_df*^2)
        score[says] = 1.0 - (squared.sum(axis=1) - top)[says] / (top[says] * (squared.shape[1] - 1))
    return float(np.mean(score))


def _standardise(train: Floats, test: Floats) -> tuple[Floats, Floats]:
    mean, std = train.mean(axis=0), train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return (train - mean) / std, (test - mean) / std


def _mean_one_vs_rest_auc(model: LogisticRegression, x: Floats, y: Ints) -> float:
    """Macro ROC-AUC of each class's predicted probability against that class, over the classes that
    both occur and do not occur in y (the reference errs on a class missing from the test draw)."""
    proba = model.predict_proba(x)
    aucs = [roc_auc_score(y == c, proba[:, k]) for k, c in enumerate(model.classes_) if 0 < np.sum(y == c) < len(y)]
    return float(np.mean(aucs))


def _mean_auc_by_ranks(proba: Floats, classes: np.ndarray, y: Ints) -> float:
    """`_mean_one_vs_rest_auc` from the predicted probabilities, as the Mann-Whitney statistic of their ranks
    (ties count half): roc_auc_score's value, for all classes in one ranking, as the bootstrap needs."""
    ranks = rankdata(proba, axis=0)
    aucs = []
    for k, c in enumerate(classes):
        positive = y == c
        p = int(positive.sum())
        if 0 < p < len(y):
            aucs.append((ranks[positive, k].sum() - p * (p + 1) / 2) / (p * (len(y) - p)))
    return float(np.mean(aucs)) if aucs else math.nan  # one class only: undefined


def _explicitness(codes: Floats, factors: Ints, codes_test: Floats, factors_test: Ints,
                  seed: int) -> tuple[float, float, list[tuple[Floats, np.ndarray]]]:
    """Mean over factors of the train and test ROC-AUC of a logistic regression from all standardised latents,
    and per factor the test probabilities and the classes they are of (for the SE)."""
    x_train, x_test = _standardise(codes, codes_test)
    train, test, fitted = [], [], []
    for f in range(factors.shape[1]):
        model = LogisticRegression(random_state=seed).fit(x_train, factors[:, f])
        train.append(_mean_one_vs_rest_auc(model, x_train, factors[:, f]))
        test.append(_mean_one_vs_rest_auc(model, x_test, factors_test[:, f]))
        fitted.append((model.predict_proba(x_test), model.classes_))
    return float(np.mean(train)), float(np.mean(test)), fitted


def _modularity(codes: Floats, factors: Ints, num_bins: int) -> float:
    return modularity_from_mutual_information(mutual_information_matrix(histogram_discretise(codes, num_bins), factors))


def modularity_explicitness(data: FactorData, encode: Encode, rng: np.random.Generator, *, num_train: int = 10_000,
                            num_test: int = 5_000, num_bins: int = NUM_BINS,
                            se_resamples: int = SE_RESAMPLES) -> dict[str, float]:
    """Modularity and explicitness (Ridgeway & Mozer 2018, "Learning deep disentangled embeddings with the
    F-statistic loss", NeurIPS). Modularity: each latent carries information about one factor at most,
    from the histogram mutual information of the training codes; it does not ask that a latent carry
    anything (noise can score well). Explicitness: how linearly the factors can be read from all latents
    together, mean one-vs-rest ROC-AUC of a logistic regression (scikit-learn defaults, as the reference)
    on standardised codes: 0.5 is chance, and a rotation of the code changes it little.

    Defaults (config/unsupervised_study_v1/metric_configs/modularity_explicitness.gin): num_train=10000,
    num_test=5000, num_bins=20. Both are invariant to permuting latents and to affine maps of each one.

    SEs: modularity_score_se by bootstrap over the num_train codes (bins and I redone on each resample);
    explicitness_score_test_se over the num_test points, the regressions held fixed.
    """
    codes, factors = sample_codes(data, encode, num_train, rng)
    codes_test, factors_test = sample_codes(data, encode, num_test, rng)
    train, test, fitted = _explicitness(codes, factors, codes_test, factors_test, _seed(rng))
    out = {"modularity_score": _modularity(codes, factors, num_bins),
           "explicitness_score_train": train, "explicitness_score_test": test}
    _with_se(out, "modularity_score", lambda i: _modularity(codes[i], factors[i], num_bins), num_train, rng,
             se_resamples)

    def explicitness(i: Ints) -> float:  # NaN where a factor takes one value in the resample
        return float(np.mean([_mean_auc_by_ranks(proba[i], classes, factors_test[i, f])
                              for f, (proba, classes) in enumerate(fitted)]))

    return _with_se(out, "explicitness_score_test", explicitness, num_test, rng, se_resamples)


# ---- estimator settings, logged with each metric -------------------------------------------------
METRICS: dict[str, Callable[..., dict[str, float]]] = {
    "beta_vae": beta_vae_score,
    "factor_vae": factor_vae_score,
    "mig": mig,
    "sap": sap_score,
    "dci": dci,
    "modularity_explicitness": modularity_explicitness,
}

_PAPERS = {
    "beta_vae": "Higgins et al. 2017, beta-VAE (ICLR)",
    "factor_vae": "Kim & Mnih 2018, Disentangling by factorising (ICML)",
    "mig": "Chen et al. 2018, Isolating sources of disentanglement in VAEs (NeurIPS)",
    "sap": "Kumar et al. 2018, Variational inference of disentangled latent concepts (ICLR)",
    "dci": "Eastwood & Williams 2018, A framework for the quantitative evaluation of disentangled "
           "representations (ICLR)",
    "modularity_explicitness": "Ridgeway & Mozer 2018, Learning deep disentangled embeddings with the F-statistic loss "
                               "(NeurIPS)",
}


def _estimator(metric: str, params: dict[str, Any]) -> str:
    if metric == "beta_vae":
        return "sklearn LogisticRegression() on mean |z1 - z2| over batch_size pairs sharing one factor"
    if metric == "factor_vae":
        return ("majority vote on argmin_d of batch variance / global variance (ddof=1); "
                "latents with global std < prune_threshold pruned")
    if metric == "mig":
        return ("per-latent equal-width histogram bins; plug-in mutual information as sklearn mutual_info_score "
                "(nats); factor entropy as I(v; v)")
    if metric == "sap":
        if params["continuous_factors"]:
            return "R^2 of a linear fit of each factor on each latent (training codes)"
        return f"sklearn LinearSVC(C={SAP_SVC_C}, class_weight='balanced') per (latent, factor), test accuracy"
    if metric == "dci":
        if params["importance"] == "gbt":
            return "sklearn GradientBoostingClassifier() per factor, impurity importances; accuracy"
        forest = ", ".join(f"{k}={v}" for k, v in FOREST.items())
        return f"sklearn RandomForestClassifier({forest}) per factor, impurity importances; accuracy"
    return ("per-latent equal-width histogram bins, plug-in mutual information as sklearn mutual_info_score; "
            "sklearn LogisticRegression() on standardised latents per factor, macro one-vs-rest ROC-AUC")


def _se_method(metric: str, params: dict[str, Any]) -> str:
    """How the metric's standard errors are estimated, in words (none are when se_resamples < 2)."""
    if params["se_resamples"] < 2:
        return "none (se_resamples < 2)"
    over = f"bootstrap, {params['se_resamples']} resamples with replacement of the"
    if metric == "beta_vae":
        return f"eval_accuracy: {over} num_eval points, the classifier held fixed"
    if metric == "factor_vae":
        return f"eval_accuracy: {over} num_eval votes, the majority-vote classifier held fixed"
    if metric == "mig":
        return f"discrete_mig: {over} num_train codes, bins, I and H redone on each"
    if metric == "sap":
        if params["continuous_factors"]:
            return f"sap_score: {over} num_train codes, R^2 redone on each"
        return f"sap_score: {over} num_test points, the SVMs held fixed"
    if metric == "dci":
        return (f"informativeness_test: {over} num_test points, the predictors held fixed; disentanglement and "
                f"completeness: std over {params['se_parts']} disjoint parts of the num_train codes, importances "
                f"fitted on each, / sqrt({params['se_parts']})")
    return (f"modularity_score: {over} num_train codes, bins and I redone on each; explicitness_score_test: {over} "
            "num_test points, the regressions held fixed")


def images_encoded(metric: str, **params: Any) -> int:
    """How many observations the metric renders and encodes with these settings (defaults where not given)."""
    p = {**_defaults(metric), **params}
    if metric == "beta_vae":
        return 2 * p["batch_size"] * (p["num_train"] + p["num_eval"])
    if metric == "factor_vae":
        return p["num_variance_estimate"] + p["batch_size"] * (p["num_train"] + p["num_eval"])
    if metric == "mig":
        return int(p["num_train"])
    return int(p["num_train"] + p["num_test"])


def _defaults(metric: str) -> dict[str, Any]:
    if metric not in METRICS:
        raise ValueError(f"unknown disentanglement metric {metric!r}; known: {', '.join(METRICS)}")
    parameters = inspect.signature(METRICS[metric]).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


def metric_settings(metric: str, **overrides: Any) -> dict[str, Any]:
    """The estimator settings of one metric (its sample sizes, bins and classifier, the defaults with
    `overrides` applied), as plain values to log with its numbers. `metric` is a key of METRICS."""
    params = _defaults(metric)
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        raise TypeError(f"{metric} takes no setting(s) {unknown}; it takes {sorted(params)}")
    params.update(overrides)
    return {"metric": metric, "paper": _PAPERS[metric], "estimator": _estimator(metric, params), **params,
            "se_method": _se_method(metric, params), "images_encoded": images_encoded(metric, **params),
            "reference": "google-research/disentanglement_lib evaluation/metrics"}
