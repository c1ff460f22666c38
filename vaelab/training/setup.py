"""Building what training needs from a run spec: the device, the seeded model, the optimiser."""

from __future__ import annotations

import torch

from vaelab.errors import UserInputError
from vaelab.models import VAE
from vaelab.models.build import build_model


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserInputError("train.device=cuda but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def init_model(run_spec, shape: tuple[int, int, int], device: torch.device) -> VAE:
    """Build the spec's model with weights seeded by train.seed."""
    torch.manual_seed(run_spec.train.seed)
    return build_model(run_spec, shape).to(device)


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adam, fused into one kernel per step where the parameters allow it (CPU and
    CUDA floats): for a small MLP the unfused update costs as much as a matmul."""
    params = list(model.parameters())
    fusable = all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fusable or None)
