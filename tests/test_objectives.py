"""Every term against torch.distributions, and the analytic KL (the Gaussian prior's, the one copy training
uses) against a Monte Carlo estimate."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from vaelab.likelihoods import Bernoulli as BernoulliLikelihood
from vaelab.models.priors.gaussian import StandardNormal, kl_per_dimension
from vaelab.objectives import KLWeighting, vae_terms


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) per example, as a run with the Gaussian prior computes it."""
    return StandardNormal().kl_dims(mu, logvar).sum(-1)


@pytest.fixture
def posterior():
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    logvar = torch.randn(6, 5, generator=gen, dtype=torch.float64) * 0.5
    return mu, logvar


def test_kl_matches_torch_distributions(posterior):
    mu, logvar = posterior
    q = Independent(Normal(mu, (0.5 * logvar).exp()), 1)
    p = Independent(Normal(torch.zeros_like(mu), torch.ones_like(mu)), 1)
    torch.testing.assert_close(kl_to_standard_normal(mu, logvar), kl_divergence(q, p))


def test_kl_matches_monte_carlo(posterior):
    mu, logvar = posterior
    q = Independent(Normal(mu, (0.5 * logvar).exp()), 1)
    p = Independent(Normal(torch.zeros_like(mu), torch.ones_like(mu)), 1)
    torch.manual_seed(1)
    z = q.sample((200_000,))
    monte_carlo = (q.log_prob(z) - p.log_prob(z)).mean(0)
    analytic = kl_to_standard_normal(mu, logvar)
    # Standard error of the estimate is ~0.01 nats here; 0.05 is five of them.
    assert torch.allclose(monte_carlo, analytic, atol=0.05), (monte_carlo, analytic)


def test_kl_is_zero_at_the_prior():
    zeros = torch.zeros(3, 4)
    assert torch.equal(kl_to_standard_normal(zeros, zeros), torch.zeros(3))


def test_beta_weights_only_the_kl(posterior):
    mu, logvar = posterior
    x = torch.rand(6, 1, 2, 2, dtype=torch.float64)
    params = torch.zeros_like(x)
    one = vae_terms(x, params, kl_per_dimension(mu, logvar), BernoulliLikelihood(), 1.0)
    four = vae_terms(x, params, kl_per_dimension(mu, logvar), BernoulliLikelihood(), 4.0)
    torch.testing.assert_close(one.recon, four.recon)
    torch.testing.assert_close(four.loss, four.recon + 4 * four.kl)
    torch.testing.assert_close(one.neg_elbo, four.neg_elbo)


def test_schedule_values():
    linear = KLWeighting(beta=2.0, schedule="linear", warmup_epochs=4)
    assert [linear.weight(t) for t in (0, 1, 2, 4, 9, math.inf)] == [0.0, 0.5, 1.0, 2.0, 2.0, 2.0]
    cyclical = KLWeighting(beta=1.0, schedule="cyclical", cycles=2, total_epochs=8)  # cycles of 4 epochs
    assert [cyclical.weight(t) for t in (0, 1, 2, 3, 4, 5, 6)] == [0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0]
    assert cyclical.weight(math.inf) == 1.0
    capacity = KLWeighting(schedule="capacity", capacity_max=20.0, capacity_epochs=10, gamma=100.0)
    assert [capacity.capacity(t) for t in (0, 5, 10, 30, math.inf)] == [0.0, 10.0, 20.0, 20.0, 20.0]
    assert KLWeighting(beta=3.0).weight(0) == 3.0


def test_capacity_objective_is_gamma_times_distance_to_c():
    recon, kl = torch.tensor([10.0, 20.0]), torch.tensor([4.0, 16.0])
    weighting = KLWeighting(schedule="capacity", capacity_max=20.0, capacity_epochs=10, gamma=100.0)
    loss = weighting.per_example(recon, kl, t=5.0)  # C(5) = 10
    torch.testing.assert_close(loss, torch.tensor([10.0 + 100 * 6, 20.0 + 100 * 6]))


def test_free_bits_floor_each_dimension_of_the_batch_kl():
    recon = torch.tensor([1.0, 3.0])
    kl_dims = torch.tensor([[0.1, 2.0], [0.3, 4.0]])  # batch means: 0.2 and 3.0
    weighting = KLWeighting(beta=1.0, free_bits=0.5)
    # dimension 0 counts 0.5 (its floor), dimension 1 its own 3.0
    assert weighting.objective(recon, kl_dims, t=1.0).item() == pytest.approx(2.0 + 0.5 + 3.0)
    assert KLWeighting(beta=1.0).objective(recon, kl_dims, t=1.0).item() == pytest.approx(2.0 + 0.2 + 3.0)
