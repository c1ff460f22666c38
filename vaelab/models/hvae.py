"""Two stochastic layers (model.levels: 2), the two-level VAE of the IWAE paper (Burda et al. 2016,
section 5): inference q(z1|x) q(z2|z1), generation p(z2) p(z1|z2) p(x|z1), every conditional a
diagonal Gaussian (p(x|z1) the run's likelihood) computed by an MLP. x <-> z1 are the one-level MLP's
encoder and decoder (model.hidden, model.hidden_act: their weights keep the one-level names), z1 <-> z2
take model.hidden2 (null: model.hidden). The prior (model.prior) is on z2; for the VampPrior its
components are q(z2 | mean of q(z1|u_k)) at the pseudo-inputs u_k (`top_posterior`). No KL term has a
closed form here: the VAE estimates it by Monte Carlo from `latent_pass`'s log ratio."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vaelab.likelihoods import Likelihood
from vaelab.models.dense import dense_stack
from vaelab.models.mlp import build_mlp
from vaelab.models.priors.gaussian import gaussian_log_density, standard_normal_log_density
from vaelab.models.vae import VAE, full


class GaussianLayer(nn.Module):
    """h (..., n_in) -> (mu, logvar) of a diagonal Gaussian, each (..., n_out), through hidden dense layers."""

    def __init__(self, n_in: int, hidden: tuple[int, ...], n_out: int, act: str):
        super().__init__()
        self.body = dense_stack([n_in, *hidden], act)
        self.head = nn.Linear(hidden[-1], 2 * n_out)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.head(self.body(h)).chunk(2, dim=-1)
        return mu, logvar


class HierarchicalVAE(VAE):
    """`encode` stays q(z1|x) and `decode` takes z1, so figures, the probe, latent statistics and
    `vaelab encode` see the bottom code; the noise of one sample is (e1, e2), z1's then z2's."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, encoder2: GaussianLayer, decoder2: GaussianLayer,
                 z_dim: int, z2_dim: int, likelihood: Likelihood, prior: nn.Module | None = None):
        super().__init__(encoder, decoder, z_dim, likelihood, prior=prior)
        self.encoder2 = encoder2  # q(z2 | z1)
        self.decoder2 = decoder2  # p(z1 | z2)
        self.z2_dim = z2_dim

    @property
    def noise_dim(self) -> int:
        return self.z_dim + self.z2_dim

    @property
    def top_dim(self) -> int:
        return self.z2_dim

    @property
    def per_dimension_kl(self) -> bool:
        return False

    def top_posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """q(z2 | z1 = the mean of q(z1|x)): a Gaussian stand-in for the marginal q(z2|x), which is not one
        (the VampPrior's components on the top level)."""
        return self.encoder2(self.encode(x)[0])

    def latent_pass(self, mu: Tensor, logvar: Tensor, noise: Tensor,
                    y: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """z1 = mu + e1 std1, z2 ~ q(z2|z1) by e2; log_ratio = log q(z1|x) + log q(z2|z1) - log p(z1|z2) - log p(z2)
        per sample (Burda et al. 2016, eq. 8's log weight, less log p(x|z1)); params = decode(z1)."""
        e1, e2 = full(noise[..., : self.z_dim]), full(noise[..., self.z_dim :])
        mu, logvar = full(mu), full(logvar)  # the log-densities in at least fp32, also under bf16 autocast
        z1 = mu + e1 * torch.exp(0.5 * logvar)
        mu2, logvar2 = (full(t) for t in self.encoder2(z1))
        z2 = mu2 + e2 * torch.exp(0.5 * logvar2)
        # log N(mu + e std; mu, std^2) = log N(e; 0, I) - sum log std: exact for the reparameterised draws
        log_q = (standard_normal_log_density(e1) - 0.5 * logvar.sum(-1)
                 + standard_normal_log_density(e2) - 0.5 * logvar2.sum(-1))
        log_p = gaussian_log_density(z1, *(full(t) for t in self.decoder2(z2))) + self.prior.log_prob(z2, self)
        return self._decode_samples(z1, y), z1, log_q - log_p

    def sample_codes(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """Ancestral sampling: z2 from the prior, z1 ~ p(z1|z2); z1 is what `decode` takes."""
        device = device if device is not None else next(self.parameters()).device
        z2 = self.prior.sample(n, generator, self, device)
        mu1, logvar1 = self.decoder2(z2)
        eps = torch.randn(mu1.shape, generator=generator, device=device, dtype=mu1.dtype)
        return mu1 + eps * torch.exp(0.5 * logvar1)


def build_hvae(shape: tuple[int, int, int], model_spec: Any, likelihood: Likelihood, prior: nn.Module) -> VAE:
    """The spec's two-level model (model.levels 2; runspec.check_run keeps it to model.arch mlp, unconditional)."""
    z1 = model_spec.z_dim
    z2 = model_spec.z2_dim if model_spec.z2_dim is not None else z1
    hidden2 = tuple(model_spec.hidden2 if model_spec.hidden2 is not None else model_spec.hidden)
    act = model_spec.hidden_act
    encoder, decoder = build_mlp(shape, model_spec)  # q(z1|x), p(x|z1)
    encoder2 = GaussianLayer(z1, hidden2, z2, act)  # q(z2|z1)
    decoder2 = GaussianLayer(z2, tuple(reversed(hidden2)), z1, act)  # p(z1|z2)
    return HierarchicalVAE(encoder, decoder, encoder2, decoder2, z1, z2, likelihood, prior)
