"""Fully connected encoder and decoder (Kingma & Welling 2014, appendix C)."""

from __future__ import annotations

import math

from torch import Tensor, nn

from vaelab.models.dense import dense_stack


class MLPEncoder(nn.Module):
    """x (N, C, H, W) -> (mu, logvar), each (N, z_dim)."""

    def __init__(self, shape: tuple[int, int, int], z_dim: int, hidden: tuple[int, ...], act: str = "relu"):
        super().__init__()
        self.body = dense_stack([math.prod(shape), *hidden], act)
        self.head = nn.Linear(hidden[-1], 2 * z_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.head(self.body(x.flatten(1))).chunk(2, dim=1)
        return mu, logvar


class MLPDecoder(nn.Module):
    """z (N, z_dim) -> per-pixel likelihood parameters (N, C, H, W)."""

    def __init__(self, shape: tuple[int, int, int], z_dim: int, hidden: tuple[int, ...], act: str = "relu"):
        super().__init__()
        self.shape = shape
        sizes = [z_dim, *reversed(hidden)]
        self.body = dense_stack(sizes, act)
        self.head = nn.Linear(sizes[-1], math.prod(shape))

    def forward(self, z: Tensor) -> Tensor:
        return self.head(self.body(z)).view(-1, *self.shape)


def build_mlp(shape: tuple[int, int, int], model_spec) -> tuple[nn.Module, nn.Module]:
    hidden, act = tuple(model_spec.hidden), model_spec.hidden_act
    return MLPEncoder(shape, model_spec.z_dim, hidden, act), MLPDecoder(shape, model_spec.z_dim, hidden, act)
