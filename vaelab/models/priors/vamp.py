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

from vaelab.models.priors.gaussian import LOG_2PI

INIT_MEAN, INIT_STD = 0.05, 0.01


def mixture_log_densities(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu_k, diag(exp(logvar_k))) for every row of z (..., D) and component k: (..., K). Expanded
    into two matmuls, sum_d (z_d^2 - 2 z_d mu_kd + mu_kd^2) / var_kd, so it holds rows x K numbers and not
    rows x K x D (an IWAE estimate's 16,384 rows x 500 components x 40 dimensions would be 1.3 GB), in
    float64 so the expansion loses no digits to cancellation."""
    precision = torch.exp(-logvar.double())  # (K, D); in float64, a small variance does not overflow
    zd, mud = z.double(), mu.double()
    quadratic = zd.pow(2) @ precision.T - 2 * zd @ (mud * precision).T + (mud.pow(2) * precision).sum(-1)
    constant = logvar.double().sum(-1) + mu.shape[-1] * LOG_2PI
    return (-0.5 * (quadratic + constant)).to(z.dtype)


class VampPrior(nn.Module):
    closed_form_kl = False  # the VAE estimates its KL by Monte Carlo

    def __init__(self, components: int, shape: tuple[int, int, int]):
        super().__init__()
        self.pseudo_inputs = nn.Parameter(torch.randn(components, *shape) * INIT_STD + INIT_MEAN)

    def components(self, model: Any) -> tuple[Tensor, Tensor]:
        """(mu, logvar) of q(z | u_k) for every pseudo-input, (K, D) each."""
        return model.top_posterior(nn.functional.hardtanh(self.pseudo_inputs, 0.0, 1.0))

    def log_prob(self, z: Tensor, model: Any) -> Tensor:
        """log p(z) = logsumexp_k log q(z | u_k) - log K, for z of any leading shape (..., D)."""
        mu, logvar = self.components(model)
        return torch.logsumexp(mixture_log_densities(z, mu, logvar), dim=-1) - math.log(len(mu))

    def sample(self, n: int, generator: torch.Generator | None, model: Any, device: Any) -> Tensor:
        mu, logvar = self.components(model)
        pick = torch.randint(len(mu), (n,), generator=generator, device=device)
        eps = torch.randn((n, mu.shape[1]), generator=generator, device=device)
        return mu[pick] + eps * torch.exp(0.5 * logvar[pick])

    def kl_dims(self, mu: Tensor, logvar: Tensor) -> None:
        return None  # no closed form: Monte Carlo (vaelab.models.vae)


def build(model_spec: Any, shape: tuple[int, int, int]) -> VampPrior:
    return VampPrior(model_spec.prior_components, shape)
