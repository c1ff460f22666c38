"""Every term against torch.distributions, and the analytic KL against a Monte
Carlo estimate."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from vaelab.likelihoods import Bernoulli as BernoulliLikelihood
from vaelab.objectives import kl_to_standard_normal, vae_terms


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
    one = vae_terms(x, params, mu, logvar, BernoulliLikelihood(), beta=1.0)
    four = vae_terms(x, params, mu, logvar, BernoulliLikelihood(), beta=4.0)
    torch.testing.assert_close(one.recon, four.recon)
    torch.testing.assert_close(four.loss, four.recon + 4 * four.kl)
    torch.testing.assert_close(one.neg_elbo, four.neg_elbo)
