"""The gated dense layer (model.hidden_act: gated) of the VampPrior and Exemplar-VAE papers'
MLPs (Tomczak & Welling 2018, section 5; after Dauphin et al. 2017's gated linear unit):
h = (W x + b) * sigmoid(V x + c), two linear maps of the same input, the second a gate."""

from __future__ import annotations

from torch import Tensor, nn


class GatedDense(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.h = nn.Linear(n_in, n_out)
        self.g = nn.Linear(n_in, n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.h(x) * self.g(x).sigmoid()


def gated_layer(n_in: int, n_out: int) -> list[nn.Module]:
    return [GatedDense(n_in, n_out)]
