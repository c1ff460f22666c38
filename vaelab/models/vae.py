"""The VAE: an encoder to a diagonal Gaussian q(z|x), a decoder to likelihood
parameters, and the reparameterised sample between them (Kingma & Welling 2014)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vaelab.likelihoods import Likelihood


@dataclass
class VAEOutput:
    params: Tensor  # decoder output: likelihood parameters per pixel
    mu: Tensor
    logvar: Tensor
    z: Tensor


class VAE(nn.Module):
    """With num_classes > 0 it is a conditional VAE (Sohn et al. 2015): the encoder sees
    the label as one-hot planes beside the image, the decoder as a one-hot beside z.
    Unconditional models ignore labels."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, z_dim: int, likelihood: Likelihood,
                 num_classes: int = 0):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.likelihood: Likelihood = likelihood  # a submodule: a learned sigma trains and saves with the model
        self.z_dim = z_dim
        self.num_classes = num_classes
        # Saved with the weights, so a checkpoint rebuilds a conditional model without its data.
        self.register_buffer("n_classes", torch.tensor(num_classes))

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

    def decode(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        if self.num_classes:
            z = torch.cat([z, self._one_hot(y, len(z), z.device).to(z.dtype)], dim=1)
        return self.decoder(z)

    def forward(self, x: Tensor, generator: torch.Generator | None = None, y: Tensor | None = None,
                noise: Tensor | None = None) -> VAEOutput:
        """`noise` (N, z_dim) replaces the standard-normal draw: stacked training
        draws it outside a vmap, from each member's own generator."""
        mu, logvar = self.encode(x, y)
        if noise is None:
            noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + noise * torch.exp(0.5 * logvar)
        return VAEOutput(params=self.decode(z, y), mu=mu, logvar=logvar, z=z)
