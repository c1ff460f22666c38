"""The standard normal prior p(z) = N(0, I) (Kingma & Welling 2014): the KL of a diagonal Gaussian
posterior to it has a closed form per dimension (their appendix B)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

LOG_2PI = math.log(2 * math.pi)


def standard_normal_log_density(z: Tensor) -> Tensor:
    """log N(z; 0, I), summed over the last dimension."""
    return (-0.5 * z.pow(2) - 0.5 * LOG_2PI).sum(-1)


def kl_per_dimension(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) of each latent dimension, (N, z_dim), in closed form (Kingma & Welling
    2014, appendix B): the one copy of the formula; training, validation and the figures reach it through the
    prior's `kl_dims`."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def gaussian_log_density(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, diag(exp(logvar))), summed over the last dimension."""
    return (-0.5 * (z - mu).pow(2) * torch.exp(-logvar) - 0.5 * logvar - 0.5 * LOG_2PI).sum(-1)


class StandardNormal(nn.Module):
    closed_form_kl = True  # kl_dims below

    def log_prob(self, z: Tensor, model: Any = None) -> Tensor:
        return standard_normal_log_density(z)

    def sample(self, n: int, generator: torch.Generator | None, model: Any, device: Any) -> Tensor:
        return torch.randn((n, model.top_dim), generator=generator, device=device)

    def kl_dims(self, mu: Tensor, logvar: Tensor) -> Tensor:
        """KL(N(mu, exp(logvar)) || N(0, 1)) of each dimension, in closed form."""
        return kl_per_dimension(mu, logvar)


def build(model_spec: Any, shape: tuple[int, int, int]) -> StandardNormal:
    return StandardNormal()
