"""Hidden dense layers of an MLP, by model.hidden_act (vaelab.registry.HIDDEN_ACTS): each builder
gives the modules of one (n_in -> n_out) layer, laid out flat in the stack (Linear, ReLU, Linear,
ReLU, ...), so the weights' names are those of checkpoints written before layers were a choice.
Gated layers are their own module (vaelab.models.gated)."""

from __future__ import annotations

from torch import nn

from vaelab import registry


def relu_layer(n_in: int, n_out: int) -> list[nn.Module]:
    return [nn.Linear(n_in, n_out), nn.ReLU()]


def tanh_layer(n_in: int, n_out: int) -> list[nn.Module]:
    """The IWAE paper's deterministic layers (Burda et al. 2016, section 5)."""
    return [nn.Linear(n_in, n_out), nn.Tanh()]


def dense_stack(sizes: list[int], act: str = "relu") -> nn.Sequential:
    """Hidden layers sizes[0] -> sizes[1] -> ... -> sizes[-1], each of the `act` kind."""
    layer = registry.HIDDEN_ACTS[act]
    return nn.Sequential(*(module for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=False)
                           for module in layer.build(n_in, n_out)))
