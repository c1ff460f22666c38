"""The analytic KL to the prior and the beta-weighted loss (likelihoods: vaelab.likelihoods).

Every term is in nats per example (summed over pixels, averaged over the batch),
so numbers compare with the VAE literature.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from vaelab.likelihoods import Likelihood


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
