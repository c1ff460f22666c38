"""Every likelihood against torch.distributions, and as a density that integrates to one."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.distributions import Bernoulli, ContinuousBernoulli, Independent, Laplace, Normal

from vaelab.likelihoods import MIN_SIGMA
from vaelab.models.build import build_model
from vaelab.registry import LIKELIHOODS
from vaelab.spec import RunSpec

SHAPE = (1, 4, 4)


def make(name: str, sigma: float = 0.2, mode: str = "shared"):
    loss = dataclasses.replace(RunSpec().loss, likelihood=name, sigma=sigma, sigma_mode=mode)
    return LIKELIHOODS[name].build(loss, SHAPE)


@pytest.fixture
def params():
    return torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.fixture
def x():
    return torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def reference(name: str, params: torch.Tensor, sigma: float):
    mean = torch.sigmoid(params)
    return {
        "bernoulli": lambda: Bernoulli(logits=params),
        "continuous_bernoulli": lambda: ContinuousBernoulli(logits=params),
        "gaussian": lambda: Normal(mean, sigma),
        "gaussian_learned": lambda: Normal(mean, sigma),
        "laplace": lambda: Laplace(mean, sigma),
    }[name]()


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_log_prob_matches_torch_distributions(name, params, x):
    if name == "bernoulli":
        x = (x > 0.5).double()
    likelihood = make(name).double()
    expected = Independent(reference(name, params, 0.2), 3).log_prob(x)
    torch.testing.assert_close(likelihood.log_prob(x, params), expected)


@pytest.mark.parametrize("name", ["continuous_bernoulli", "gaussian", "laplace"])
def test_one_pixel_density_integrates_to_one(name):
    # Integrate the density of a single pixel over a fine grid: a real density gives 1.
    likelihood = make(name, sigma=0.05).double()
    lo, hi = (0.0, 1.0) if name == "continuous_bernoulli" else (-1.0, 2.0)
    grid = torch.linspace(lo, hi, 200_001, dtype=torch.float64)
    param = torch.full((len(grid), 1, 1, 1), 0.3, dtype=torch.float64)
    density = likelihood.log_prob(grid.view(-1, 1, 1, 1), param).exp()
    assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=1e-4)


def test_mean_of_continuous_bernoulli_is_not_the_sigmoid(params):
    mean = make("continuous_bernoulli").mean(params)
    torch.testing.assert_close(mean, ContinuousBernoulli(logits=params).mean)
    assert not torch.allclose(mean, torch.sigmoid(params))


@pytest.mark.parametrize("mode", ["shared", "per_pixel"])
def test_learned_sigma_is_a_parameter_of_the_model(mode):
    run = RunSpec()
    run = dataclasses.replace(run, loss=dataclasses.replace(run.loss, likelihood="gaussian_learned", sigma=0.3,
                                                            sigma_mode=mode))
    model = build_model(run, (1, 28, 28))
    names = [n for n, _ in model.named_parameters()]
    assert "likelihood.log_sigma" in names
    assert model.likelihood.log_sigma.shape == (() if mode == "shared" else (1, 28, 28))
    assert "likelihood.log_sigma" in model.state_dict()
    assert model.likelihood.sigma().mean().item() == pytest.approx(0.3, rel=1e-6)
    # A smaller sigma fits data close to the mean better: the gradient pushes log sigma down.
    x = torch.full((2, 1, 28, 28), 0.5)
    loss = -model.likelihood.log_prob(x, torch.zeros_like(x)).mean()
    loss.backward()
    assert model.likelihood.log_sigma.grad.sum().item() > 0


def test_learned_sigma_has_a_floor():
    likelihood = make("gaussian_learned", sigma=1e-6)
    assert likelihood.sigma().item() == pytest.approx(MIN_SIGMA)


def test_fixed_gaussian_has_no_parameters_and_keeps_its_constant():
    likelihood = make("gaussian", sigma=0.1)
    assert list(likelihood.parameters()) == []
    x = torch.full((1, *SHAPE), 0.5)
    value = likelihood.log_prob(x, torch.zeros_like(x)).item()  # a perfect mean still costs the constant
    assert value == pytest.approx(-16 * (math.log(0.1) + 0.5 * math.log(2 * math.pi)), rel=1e-5)
