"""The VAE: an encoder to a diagonal Gaussian q(z|x), a decoder to likelihood parameters, the
reparameterised sample between them (Kingma & Welling 2014), and a prior p(z) (model.prior:
vaelab.models.priors). `latent_pass` is the one place a sampled code meets the prior and the
decoder: training (one or k samples per image), validation, test/elbo and the IWAE estimate all
go through it, so a prior or a second stochastic level (vaelab.models.hvae) is one override."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vaelab.likelihoods import Likelihood
from vaelab.models.priors.gaussian import StandardNormal, standard_normal_log_density


@dataclass
class VAEOutput:
    params: Tensor  # decoder output: likelihood parameters per pixel, (S * N, C, H, W) for S samples
    mu: Tensor  # q(z|x) of the code (the bottom level of a two-level model), (N, z_dim)
    logvar: Tensor
    z: Tensor  # the sampled code, (N, z_dim), or (S, N, z_dim)
    # The KL to the prior of each example: (N, z_dim) per dimension where the prior has a closed form,
    # else (N, 1), the Monte Carlo estimate log q(z|x) - log p(z) averaged over the S samples.
    kl: Tensor
    log_ratio: Tensor  # log q(z|x) - log p(z) of each sample (all levels), (N,) or (S, N)


def full(t: Tensor) -> Tensor:
    """`t` in at least fp32: a bf16 or fp16 autocast output widened for the log-densities (sums over
    dimensions need the bits); fp32 and fp64 pass as they are."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def _log_q(noise: Tensor, logvar: Tensor) -> Tensor:
    """log N(mu + noise * std; mu, std^2), summed over the last dimension: it depends on the noise only."""
    return standard_normal_log_density(noise) - 0.5 * logvar.sum(-1)


class VAE(nn.Module):
    """With num_classes > 0 it is a conditional VAE (Sohn et al. 2015): the encoder sees
    the label as one-hot planes beside the image, the decoder as a one-hot beside z.
    Unconditional models ignore labels."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, z_dim: int, likelihood: Likelihood,
                 num_classes: int = 0, prior: nn.Module | None = None):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.likelihood: Likelihood = likelihood  # a submodule: a learned sigma trains and saves with the model
        # p(z): log_prob(z, model), sample(n, generator, model, device), kl_dims(mu, logvar) (vaelab.models.priors)
        self.prior: Any = prior if prior is not None else StandardNormal()
        self.z_dim = z_dim
        self.num_classes = num_classes
        # Saved with the weights, so a checkpoint rebuilds a conditional model without its data.
        self.register_buffer("n_classes", torch.tensor(num_classes))

    @property
    def noise_dim(self) -> int:
        """Standard-normal numbers one sample of the code takes (every level's)."""
        return self.z_dim

    @property
    def top_dim(self) -> int:
        """Dimensions of the latent the prior is on."""
        return self.z_dim

    @property
    def per_dimension_kl(self) -> bool:
        """Whether the KL to the prior splits by code dimension in closed form (a Gaussian prior, one level)."""
        return bool(getattr(self.prior, "closed_form_kl", False))

    def _one_hot(self, y: Tensor | None, n: int, device) -> Tensor:
        if y is None:  # e.g. samples: cycle through the classes
            y = torch.arange(n, device=device) % self.num_classes
        return nn.functional.one_hot(y.long(), self.num_classes).float()

    def encode(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.num_classes:
            if y is None:
                raise ValueError("a conditional VAE needs the labels of the images it encodes")
            planes = self._one_hot(y, len(x), x.device)[:, :, None, None].expand(-1, -1, *x.shape[2:])
            x = torch.cat([x, planes.to(x.dtype)], dim=1)
        return self.encoder(x)

    def top_posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, logvar) of the top latent given images (the VampPrior's components)."""
        return self.encode(x)

    def decode(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        if self.num_classes:
            z = torch.cat([z, self._one_hot(y, len(z), z.device).to(z.dtype)], dim=1)
        return self.decoder(z)

    def latent_pass(self, mu: Tensor, logvar: Tensor, noise: Tensor,
                    y: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(params, z, log_ratio) for `noise` (N, noise_dim) or (S, N, noise_dim): the codes, their
        decoding (flattened over samples) and log q(z|x) - log p(z) per sample."""
        z = mu + noise * torch.exp(0.5 * logvar)
        # The log-densities in fp32 (under bf16 autocast the encoder's outputs are bf16): sums over dimensions
        log_ratio = _log_q(full(noise), full(logvar)) - self.prior.log_prob(full(z), self)
        return self._decode_samples(z, y), z, log_ratio

    def _decode_samples(self, z: Tensor, y: Tensor | None) -> Tensor:
        if z.dim() == 2:
            return self.decode(z, y)
        return self.decode(z.flatten(0, 1), None if y is None else y.repeat(z.shape[0]))

    def kl_of(self, mu: Tensor, logvar: Tensor, log_ratio: Tensor) -> Tensor:
        """The KL term of each example: the prior's closed form per dimension, or the Monte Carlo
        estimate (the mean log ratio over samples) as one column."""
        kl = self.prior.kl_dims(full(mu), full(logvar)) if self.per_dimension_kl else None
        if kl is not None:
            return kl
        return (log_ratio if log_ratio.dim() == 1 else log_ratio.mean(0)).unsqueeze(1)

    def forward(self, x: Tensor, generator: torch.Generator | None = None, y: Tensor | None = None,
                noise: Tensor | None = None) -> VAEOutput:
        """`noise` (N, noise_dim), or (S, N, noise_dim) for S samples per image, replaces the
        standard-normal draw: stacked training draws it outside a vmap, from each member's own generator."""
        mu, logvar = self.encode(x, y)
        if noise is None:
            noise = torch.randn((len(x), self.noise_dim), generator=generator, device=mu.device, dtype=mu.dtype)
        params, z, log_ratio = self.latent_pass(mu, logvar, noise, y)
        return VAEOutput(params=params, mu=mu, logvar=logvar, z=z, kl=self.kl_of(mu, logvar, log_ratio),
                         log_ratio=log_ratio)

    def sample_codes(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """n codes drawn from the model's prior (every level), as `decode` takes them."""
        device = device if device is not None else next(self.parameters()).device
        return self.prior.sample(n, generator, self, device)


def log_weights(likelihood: Likelihood, x: Tensor, params: Tensor, log_ratio: Tensor) -> Tensor:
    """log p(x, z) - log q(z|x) of each sample, (S, N), from a latent_pass over S samples of x's codes."""
    samples = log_ratio.shape[0] if log_ratio.dim() == 2 else 1
    x_rep = x.unsqueeze(0).expand(samples, *x.shape).flatten(0, 1)
    log_lik = likelihood.log_prob(x_rep, params).view(samples, len(x))
    return log_lik - log_ratio.view(samples, len(x))


def iw_bound(log_w: Tensor) -> Tensor:
    """The k-sample importance-weighted bound on log p(x) of each image (Burda et al. 2016, eq. 8):
    log (1/k) sum_i w_i, from log weights (k, N)."""
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])
