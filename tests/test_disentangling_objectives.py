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
from vaelab.objectives import OBJECTIVES, kl_weighting
from vaelab.objectives.beta_tcvae import total_correlation
from vaelab.objectives.dip_vae import dip_penalty
from vaelab.objectives.discriminator import Adversary, permute_dims
from vaelab.objectives.factorvae import DiscriminatorSpec, discriminator_tc
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


def penalty_for(run, dataset_size: int, critic=None):
    """A run's batch penalty as its record builds it (None without one)."""
    objective = OBJECTIVES[run.loss.objective]
    return objective.penalty(run, dataset_size, critic) if objective.penalty is not None else None


def test_beta_tcvae_weights_the_kl_by_one_and_the_total_correlation_by_beta_minus_one(mnist_root: Path):
    run = tiny_run(mnist_root, loss={"objective": "beta_tcvae", "beta": 6.0})
    assert kl_weighting(run).beta == 1.0
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g) * 0.3
    z = mu + torch.randn(8, 4, generator=g) * (0.5 * logvar).exp()
    assert float(penalty_for(run, 500)(mu, logvar, z)) == pytest.approx(5.0 * float(total_correlation(z, mu, logvar,
                                                                                                     500)))
    assert penalty_for(tiny_run(mnist_root), 500) is None
    assert "adds a batch penalty" in stack_blocker(run)


@pytest.mark.parametrize("objective", ["beta_tcvae", "factorvae", "dip_vae_i", "dip_vae_ii"])
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


def test_discriminator_tc_is_the_mean_logit_difference():
    # log D / (1 - D) with D = softmax(logits)[:, 0] is logits[:, 0] - logits[:, 1]: (2 - 0 + 0 - 1) / 2.
    assert float(discriminator_tc(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))) == pytest.approx(0.5)
    probs = torch.tensor([0.8, 0.3])
    logits = torch.stack([probs.log(), (1 - probs).log()], 1)
    assert float(discriminator_tc(logits)) == pytest.approx(float((probs / (1 - probs)).log().mean()), rel=1e-6)


def test_permute_dims_shuffles_each_column_on_its_own():
    z = torch.arange(200.0).reshape(100, 2)
    z[:, 1] = z[:, 0]  # two identical columns
    shuffled = permute_dims(z, torch.Generator().manual_seed(0))
    for d in range(2):  # every column keeps its values (the marginals)...
        assert torch.equal(shuffled[:, d].sort().values, z[:, d].sort().values)
    assert (shuffled[:, 0] != shuffled[:, 1]).float().mean() > 0.9  # ...but the pairing (the joint) is broken


def test_the_discriminator_estimates_the_total_correlation_of_a_correlated_gaussian():
    # For a 2-d Gaussian with correlation rho, TC = KL(q(z) || q(z_1) q(z_2)) = -1/2 log(1 - rho^2)
    # (the mutual information of the two coordinates): 0.830 nats at rho = 0.9. A discriminator trained
    # as FactorVAE trains it recovers that from samples alone.
    rho, gen = 0.9, torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    chol = torch.linalg.cholesky(torch.tensor([[1.0, rho], [rho, 1.0]]))
    adversary = Adversary(2, DiscriminatorSpec(layers=2, hidden=64, lr=3e-3, beta1=0.5, beta2=0.9), 0,
                          torch.device("cpu"))
    for _ in range(1500):
        adversary.step(torch.randn(512, 2, generator=gen) @ chol.T, gen)
    with torch.no_grad():
        estimate = float(discriminator_tc(adversary(torch.randn(20_000, 2, generator=gen) @ chol.T)))
    assert estimate == pytest.approx(-0.5 * math.log(1 - rho**2), abs=0.12)
    assert 0.6 < adversary.epoch_metrics()["train/discriminator_acc"] < 0.95  # better than chance, not perfect


def test_factorvae_trains_with_its_discriminator_and_reports_it(mnist_root: Path):
    base = tiny_run(mnist_root, train={"epochs": 1})
    run = with_values(base, {"loss.objective": "factorvae", "loss.factor_gamma": 20.0,
                             "loss.discriminator.layers": 2, "loss.discriminator.hidden": 32})
    codes = torch.randn(16, 4)
    critic = lambda z: torch.stack([z[:, 0], -z[:, 1]], 1)  # noqa: E731 - a fixed stand-in discriminator
    assert float(penalty_for(run, 500, critic)(codes, codes, codes)) == pytest.approx(
        20.0 * float(discriminator_tc(critic(codes))))
    assert kl_weighting(run).beta == 1.0
    assert "adds a batch penalty" in stack_blocker(run)
    data = load_data(base.data, torch.device("cpu"))
    plain = fit(base, init_model(base, data.shape, torch.device("cpu")), data, show_progress=False).history[0]
    epoch = fit(run, init_model(run, data.shape, torch.device("cpu")), data, show_progress=False).history[0]
    assert 0.0 < epoch["train/discriminator_loss"] < 2.0 and 0.0 <= epoch["train/discriminator_acc"] <= 1.0
    assert math.isfinite(epoch["train/penalty"]) and epoch["train/loss"] != plain["train/loss"]
    assert "train/penalty" not in plain and "train/discriminator_loss" not in plain


def test_a_resumed_factorvae_run_carries_on_with_its_discriminator(mnist_root: Path):
    run = with_values(tiny_run(mnist_root, train={"epochs": 2, "patience": None}),
                      {"loss.objective": "factorvae", "loss.discriminator.layers": 2,
                       "loss.discriminator.hidden": 32})
    data = load_data(run.data, torch.device("cpu"))
    whole = fit(run, init_model(run, data.shape, torch.device("cpu")), data, show_progress=False).history
    saved: list = []
    first = with_values(run, {"train.epochs": 1})
    fit(first, init_model(first, data.shape, torch.device("cpu")), data, show_progress=False,
        save_state=saved.append)
    assert set(saved[-1].aux["discriminator"]) == {"model", "optimizer"}
    resumed = fit(run, init_model(run, data.shape, torch.device("cpu")), data, show_progress=False,
                  resume=saved[-1]).history
    for key in ("train/loss", "train/discriminator_loss", "val/loss"):
        assert resumed[1][key] == pytest.approx(whole[1][key], rel=1e-6), key
