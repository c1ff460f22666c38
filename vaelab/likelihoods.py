"""Likelihoods p(x|z): decoder output -> log-density per example (nats, summed
over pixels) and the mean image. Each is an nn.Module so that learned
parameters (a learned sigma) train with the model and live in its checkpoint."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.distributions import ContinuousBernoulli as _ContinuousBernoulli

MIN_SIGMA = 1e-2  # a learned sigma below this lets constant pixels (background) dominate the ELBO


class Likelihood(nn.Module):
    # A probability mass (Bernoulli on binary pixels) rather than a density: its
    # -log p(x) is already a code length, and bits per dimension need no bin width.
    discrete = False

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def mean(self, params: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def _sum_pixels(values: Tensor) -> Tensor:
    return values.flatten(1).sum(1)


class _BCEWithLogits(torch.autograd.Function):
    """Per-pixel binary cross-entropy from logits, max(l,0) - l*x + log(1 + exp(-|l|)).

    Same values as F.binary_cross_entropy_with_logits to ~1e-6 nats per pixel, but
    twice as fast on CPU: the built-in goes through log1p, which is not vectorised
    there and was the largest non-matmul cost of an MLP training step. The gradient
    sigmoid(l) - x is written out so backward is one fused expression too."""

    @staticmethod
    def forward(ctx, logits: Tensor, x: Tensor) -> Tensor:
        ctx.save_for_backward(logits, x)
        return logits.clamp(min=0) - logits * x + torch.log(1 + torch.exp(-logits.abs()))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        logits, x = ctx.saved_tensors
        grad_logits = grad * (torch.sigmoid(logits) - x) if ctx.needs_input_grad[0] else None
        grad_x = -grad * logits if ctx.needs_input_grad[1] else None
        return grad_logits, grad_x


def bce_with_logits(logits: Tensor, x: Tensor) -> Tensor:
    """Elementwise -log Bernoulli(x | sigmoid(logits)) for x in [0, 1]."""
    return _BCEWithLogits.apply(logits, x)


class Bernoulli(Likelihood):
    """Pixels as Bernoulli probabilities; params are logits. On binary data a
    proper log-probability; on grey pixels the usual cross-entropy, not a density."""

    discrete = True

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        return -_sum_pixels(bce_with_logits(params, x))

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params)


class ContinuousBernoulli(Likelihood):
    """The normalised density on [0, 1] that Bernoulli cross-entropy lacks
    (Loaiza-Ganem & Cunningham 2019); params are logits."""

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        return _sum_pixels(_ContinuousBernoulli(logits=params).log_prob(x))

    def mean(self, params: Tensor) -> Tensor:
        return _ContinuousBernoulli(logits=params).mean  # not sigmoid(logits): the CB mean differs


class Gaussian(Likelihood):
    """N(x; sigmoid(params), sigma^2) per pixel, with its normalising constant.
    sigma is fixed, or learned (one shared value, or one per pixel)."""

    def __init__(self, sigma: float, learned: str | None = None, shape: tuple[int, ...] = ()):
        super().__init__()
        self.fixed_sigma = sigma
        self.log_sigma = None
        if learned is not None:
            self.log_sigma = nn.Parameter(torch.full(shape if learned == "per_pixel" else (), math.log(sigma)))

    def sigma(self) -> Tensor | float:
        if self.log_sigma is None:
            return self.fixed_sigma
        return self.log_sigma.exp().clamp(min=MIN_SIGMA)

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        sigma = self.sigma()
        log_sigma = math.log(sigma) if isinstance(sigma, float) else torch.log(sigma)
        z = (x - torch.sigmoid(params)) / sigma
        return _sum_pixels(-0.5 * z.pow(2) - log_sigma - 0.5 * math.log(2 * math.pi))

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params)


class Laplace(Likelihood):
    """Laplace(x; sigmoid(params), b) per pixel: an L1 reconstruction as a density."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        return _sum_pixels(-(x - torch.sigmoid(params)).abs() / self.scale - math.log(2 * self.scale))

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params)


# Builders(loss_spec, image shape) -> Likelihood, named by vaelab.registry's likelihood records
# (vaelab.models.build.build_likelihood looks them up there).
def bernoulli(loss, shape) -> Likelihood:
    return Bernoulli()


def continuous_bernoulli(loss, shape) -> Likelihood:
    return ContinuousBernoulli()


def gaussian(loss, shape) -> Likelihood:
    return Gaussian(loss.sigma)


def gaussian_learned(loss, shape) -> Likelihood:
    return Gaussian(loss.sigma, learned=loss.sigma_mode, shape=shape)


def laplace(loss, shape) -> Likelihood:
    return Laplace(loss.sigma)

