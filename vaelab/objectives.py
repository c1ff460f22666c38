"""Likelihoods p(x|z), the analytic KL to the prior, and the beta-weighted loss.

Every term is in nats per example (summed over pixels, averaged over the batch),
so numbers compare with the VAE literature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


class Likelihood:
    """Decoder output -> log p(x|z) per example and the mean image."""

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def mean(self, params: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class Bernoulli(Likelihood):
    """Pixels in [0, 1] as Bernoulli probabilities; params are logits. For
    non-binary pixels this is the usual cross-entropy, not a normalised density."""

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        nll = F.binary_cross_entropy_with_logits(params, x, reduction="none")
        return -nll.flatten(1).sum(1)

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params)


@dataclass
class FixedGaussian(Likelihood):
    """N(x; sigmoid(params), sigma^2) per pixel, with its normalising constant,
    so the value is a real log-density in nats. The sigmoid keeps means in the
    pixel range [0, 1]."""

    sigma: float

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        mean = torch.sigmoid(params)
        log_norm = math.log(self.sigma) + 0.5 * math.log(2 * math.pi)
        per_pixel = -0.5 * ((x - mean) / self.sigma) ** 2 - log_norm
        return per_pixel.flatten(1).sum(1)

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params)


def build_bernoulli(loss_spec) -> Likelihood:
    return Bernoulli()


def build_gaussian(loss_spec) -> Likelihood:
    return FixedGaussian(sigma=loss_spec.sigma)


def kl_to_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per example, in closed form
    (Kingma & Welling 2014, appendix B)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)


@dataclass
class Terms:
    """Per-example tensors (N,): reconstruction = -log p(x|z), kl, and the
    training loss recon + beta * kl. The negative ELBO is recon + kl (beta = 1)."""

    recon: Tensor
    kl: Tensor
    loss: Tensor

    @property
    def neg_elbo(self) -> Tensor:
        return self.recon + self.kl


def vae_terms(x: Tensor, params: Tensor, mu: Tensor, logvar: Tensor, likelihood: Likelihood, beta: float) -> Terms:
    recon = -likelihood.log_prob(x, params)
    kl = kl_to_standard_normal(mu, logvar)
    return Terms(recon=recon, kl=kl, loss=recon + beta * kl)
