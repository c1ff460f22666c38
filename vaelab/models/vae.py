"""The VAE: an encoder to a diagonal Gaussian q(z|x), a decoder to likelihood
parameters, and the reparameterised sample between them (Kingma & Welling 2014)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class VAEOutput:
    params: Tensor  # decoder output: likelihood parameters per pixel
    mu: Tensor
    logvar: Tensor
    z: Tensor


class VAE(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: nn.Module, z_dim: int, likelihood: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.likelihood = likelihood  # a submodule: a learned sigma trains and saves with the model
        self.z_dim = z_dim

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> VAEOutput:
        mu, logvar = self.encode(x)
        noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + noise * torch.exp(0.5 * logvar)
        return VAEOutput(params=self.decode(z), mu=mu, logvar=logvar, z=z)
