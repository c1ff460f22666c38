"""The VampPrior (Tomczak & Welling 2018, eq. 9): p(z) = (1/K) sum_k q(z | u_k), a mixture of the
encoder's own posteriors at K learned pseudo-inputs u_k (model.prior_components). The pseudo-inputs
are images in [0, 1] (a hardtanh of free parameters, as in the paper's code), initialised near
N(0.05, 0.01) like theirs. The KL to this prior has no closed form: the VAE estimates it by Monte
Carlo at its sampled z (log q(z|x) - log p(z)), in training, validation and test/elbo alike; the
IWAE estimate uses log p(z) exactly. For a two-level model the mixture is over the top level:
q(z2 | u_k) (vaelab.models.hvae)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from vaelab.models.priors.gaussian import gaussian_log_density

INIT_MEAN, INIT_STD = 0.05, 0.01


class VampPrior(nn.Module):
    def __init__(self, components: int, shape: tuple[int, int, int]):
        super().__init__()
        self.pseudo_inputs = nn.Parameter(torch.randn(components, *shape) * INIT_STD + INIT_MEAN)

    def components(self, model: Any) -> tuple[Tensor, Tensor]:
        """(mu, logvar) of q(z | u_k) for every pseudo-input, (K, D) each."""
        return model.top_posterior(nn.functional.hardtanh(self.pseudo_inputs, 0.0, 1.0))

    def log_prob(self, z: Tensor, model: Any) -> Tensor:
        """log p(z) = logsumexp_k log q(z | u_k) - log K, for z of any leading shape (..., D)."""
        mu, logvar = self.components(model)
        per_component = gaussian_log_density(z.unsqueeze(-2), mu, logvar)  # (..., K)
        return torch.logsumexp(per_component, dim=-1) - math.log(len(mu))

    def sample(self, n: int, generator: torch.Generator | None, model: Any, device: Any) -> Tensor:
        mu, logvar = self.components(model)
        pick = torch.randint(len(mu), (n,), generator=generator, device=device)
        eps = torch.randn((n, mu.shape[1]), generator=generator, device=device)
        return mu[pick] + eps * torch.exp(0.5 * logvar[pick])

    def kl_dims(self, mu: Tensor, logvar: Tensor) -> None:
        return None  # no closed form: Monte Carlo (vaelab.models.vae)


def build(model_spec: Any, shape: tuple[int, int, int]) -> VampPrior:
    return VampPrior(model_spec.prior_components, shape)
