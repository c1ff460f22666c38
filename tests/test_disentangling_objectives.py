"""beta-TCVAE's total correlation and DIP-VAE's moment penalty against hand-computed cases,
and each objective training through the one training path."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import tiny_run
from vaelab.data import load_data
from vaelab.objectives import dip_penalty, kl_weighting, penalty_for, total_correlation
from vaelab.spec import with_values
from vaelab.training import fit, init_model
from vaelab.training.stacked import stack_blocker


def tc_by_hand(z: np.ndarray, mu: np.ndarray, logvar: np.ndarray, n: int) -> float:
    """Chen et al. 2018, eq. 7 with minibatch-weighted sampling, written out with loops."""
    m, d = z.shape

    def log_q(i: int, j: int, dims) -> float:  # log q(z_i[dims] | x_j)
        var = np.exp(logvar[j, dims])
        return float(np.sum(-0.5 * (np.log(2 * np.pi * var) + (z[i, dims] - mu[j, dims]) ** 2 / var)))

    def log_mean_exp(values) -> float:
        top = max(values)
        return top + math.log(sum(math.exp(v - top) for v in values)) - math.log(n * m)

    total = 0.0
    for i in range(m):
        joint = log_mean_exp([log_q(i, j, list(range(d))) for j in range(m)])
        marginals = sum(log_mean_exp([log_q(i, j, [k]) for j in range(m)]) for k in range(d))
        total += joint - marginals
    return total / m


def test_total_correlation_matches_the_formula_written_out():
    rng = np.random.default_rng(0)
    z, mu, logvar = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)), rng.normal(scale=0.3, size=(5, 3))
    got = total_correlation(*(torch.tensor(a) for a in (z, mu, logvar)), dataset_size=1000)
    assert float(got) == pytest.approx(tc_by_hand(z, mu, logvar, 1000), rel=1e-9)


def test_total_correlation_is_zero_for_one_dimension_and_large_for_copied_dimensions():
    rng = np.random.default_rng(1)
    mu = torch.tensor(rng.normal(size=(64, 1)))
    logvar = torch.full((64, 1), math.log(0.01), dtype=torch.float64)
    z = mu + 0.1 * torch.randn(64, 1, dtype=torch.float64)
    assert float(total_correlation(z, mu, logvar, 10_000)) == pytest.approx(0.0, abs=1e-12)
    copied = total_correlation(z.repeat(1, 4), mu.repeat(1, 4), logvar.repeat(1, 4), 10_000)
    independent_mu = torch.tensor(rng.normal(size=(64, 4)))
    independent = total_correlation(independent_mu + 0.1 * torch.randn(64, 4, dtype=torch.float64), independent_mu,
                                    logvar.repeat(1, 4), 10_000)
    assert float(copied) > float(independent) + 1.0  # four copies of one code are further from factorised


def test_dip_penalties_on_a_hand_computed_batch():
    mu = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])  # Cov[mu] = diag(0.5, 0.5)
    logvar = torch.full((4, 2), math.log(0.5))
    # DIP-VAE-I: no off-diagonal covariance, each variance 0.5 off its target 1: lambda_d * 2 * 0.25.
    assert float(dip_penalty(mu, logvar, second=False, lambda_od=3.0, lambda_d=7.0)) == pytest.approx(7.0 * 0.5)
    # DIP-VAE-II adds E[sigma^2] = 0.5 to the diagonal: Cov_q(z) = I, no penalty.
    assert float(dip_penalty(mu, logvar, second=True, lambda_od=3.0, lambda_d=7.0)) == pytest.approx(0.0, abs=1e-7)
    skewed = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])  # Cov = [[1, 1], [1, 1]]: off-diagonal 1 twice
    assert float(dip_penalty(skewed, logvar[:2], second=False, lambda_od=3.0, lambda_d=7.0)) == pytest.approx(6.0)


def test_beta_tcvae_weights_the_kl_by_one_and_the_total_correlation_by_beta_minus_one(mnist_root: Path):
    run = tiny_run(mnist_root, loss={"objective": "beta_tcvae", "beta": 6.0})
    assert kl_weighting(run).beta == 1.0
    assert penalty_for(run, 500).weight == 5.0
    assert penalty_for(tiny_run(mnist_root), 500) is None
    assert "adds a batch penalty" in stack_blocker(run)


@pytest.mark.parametrize("objective", ["beta_tcvae", "dip_vae_i", "dip_vae_ii"])
def test_each_objective_trains_and_differs_from_beta_vae(objective, mnist_root: Path):
    base = tiny_run(mnist_root, train={"epochs": 1}, loss={"beta": 4.0})
    data = load_data(base.data, torch.device("cpu"))
    results = {}
    for name in ("beta_vae", objective):
        run = with_values(base, {"loss.objective": name})
        results[name] = fit(run, init_model(run, data.shape, torch.device("cpu")), data, show_progress=False)
    other = results[objective].history[0]
    assert math.isfinite(other["train/loss"]) and math.isfinite(other["val/elbo"])
    assert other["train/loss"] != results["beta_vae"].history[0]["train/loss"]


def test_beta_tcvae_at_beta_one_is_the_plain_elbo(mnist_root: Path):
    base = tiny_run(mnist_root, train={"epochs": 1}, loss={"beta": 1.0})
    data = load_data(base.data, torch.device("cpu"))
    runs = [with_values(base, {"loss.objective": name}) for name in ("beta_vae", "beta_tcvae")]
    histories = [fit(r, init_model(r, data.shape, torch.device("cpu")), data, show_progress=False).history
                 for r in runs]
    assert histories[0][0]["val/loss"] == pytest.approx(histories[1][0]["val/loss"], rel=1e-6)
