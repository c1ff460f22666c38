"""FactorVAE's discriminator and its own optimiser (Kim & Mnih 2018, "Disentangling by Factorising").

The discriminator D tells samples of q(z) from samples of prod_j q(z_j); the VAE's objective adds
factor_gamma * E_q(z)[log D(z) / (1 - D(z))], its estimate of the total correlation
(factorvae.discriminator_tc). Samples of the product of marginals come from the permute-dims trick
(Algorithm 1): each latent column of a batch shuffled independently. As in disentanglement_lib, the same batch's codes
train D right after the VAE's step (the paper draws a second batch); D never sees the VAE's gradients.
"""

from __future__ import annotations

import copy
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DiscriminatorSettings(Protocol):
    """What the discriminator reads of loss.discriminator (factorvae.DiscriminatorSpec)."""

    @property
    def layers(self) -> int: ...

    @property
    def hidden(self) -> int: ...

    @property
    def lr(self) -> float: ...

    @property
    def beta1(self) -> float: ...

    @property
    def beta2(self) -> float: ...


# D's classes: 0 = a code of q(z) (the batch as encoded), 1 = a code of prod_j q(z_j) (permuted).
JOINT, PERMUTED = 0, 1
# D's weights are drawn from train.seed plus this, so they differ from the VAE's but are reproducible.
DISCRIMINATOR_SEED_OFFSET = 3


def permute_dims(z: Tensor, generator: torch.Generator) -> Tensor:
    """Every column of z (N, D) shuffled independently across the batch: samples of prod_j q(z_j)
    (Kim & Mnih 2018, Algorithm 1)."""
    order = torch.rand(z.shape, generator=generator, device=z.device).argsort(dim=0)
    return z.gather(0, order)


class Discriminator(nn.Module):
    """z (N, z_dim) -> two logits (JOINT, PERMUTED): an MLP with leaky ReLUs (slope 0.2)."""

    def __init__(self, z_dim: int, layers: int, hidden: int):
        super().__init__()
        parts: list[nn.Module] = []
        width = z_dim
        for _ in range(layers):
            parts += [nn.Linear(width, hidden), nn.LeakyReLU(0.2)]
            width = hidden
        parts.append(nn.Linear(width, 2))
        self.net = nn.Sequential(*parts)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class Adversary:
    """The discriminator, its Adam, and the means of its loss and accuracy over an epoch."""

    def __init__(self, z_dim: int, settings: DiscriminatorSettings, seed: int, device: torch.device,
                 state: dict | None = None):
        # Seeded weights without moving the global generators (CPU and, as manual_seed reseeds them, CUDA).
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed + DISCRIMINATOR_SEED_OFFSET)
            self.net = Discriminator(z_dim, settings.layers, settings.hidden).to(device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=settings.lr,
                                          betas=(settings.beta1, settings.beta2))
        if state is not None:
            self.net.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self._sums = torch.zeros(2, device=device)
        self._steps = 0

    def __call__(self, z: Tensor) -> Tensor:
        """D's logits for codes z; the VAE's step differentiates through them to z."""
        return self.net(z)

    def step(self, z: Tensor, generator: torch.Generator) -> None:
        """One update of D on a batch's codes (detached) and their permutation."""
        z = z.detach()
        logits = self.net(torch.cat([z, permute_dims(z, generator)]))
        target = torch.cat([torch.full((len(z),), JOINT, device=z.device),
                            torch.full((len(z),), PERMUTED, device=z.device)])
        loss = F.cross_entropy(logits, target)
        self.optimizer.zero_grad(set_to_none=True)  # also drops what the VAE's backward left in D
        loss.backward()
        self.optimizer.step()
        accuracy = (logits.argmax(1) == target).float().mean()
        self._sums += torch.stack([loss.detach(), accuracy])
        self._steps += 1

    def epoch_metrics(self) -> dict[str, float]:
        """train/discriminator_* over the epoch so far (cross-entropy ln 2 = 0.693 and accuracy 0.5 are chance);
        resets the sums."""
        if self._steps == 0:
            return {}
        loss, accuracy = (self._sums / self._steps).tolist()
        self._sums.zero_()
        self._steps = 0
        return {"train/discriminator_loss": loss, "train/discriminator_acc": accuracy}

    def state(self) -> dict:
        return {"model": copy.deepcopy(self.net.state_dict()), "optimizer": copy.deepcopy(self.optimizer.state_dict())}
