"""Pre-flight check: before any training, count parameters, estimate activation
memory for one batch from a dry forward pass, and fail in seconds with a clear
message when the model does not fit the data or the device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vaelab.models import VAE, ConfigError


@dataclass(frozen=True)
class Preflight:
    n_params: int
    activation_mb: float  # forward activations of one training batch, float32
    device_free_mb: float | None


def _available_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free / 2**20
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def check(model: VAE, shape: tuple[int, int, int], batch_size: int, device: torch.device) -> Preflight:
    """Raise ConfigError if a forward pass fails or one batch cannot fit in memory."""
    sizes: list[int] = []

    def record(_module, _inputs, output):
        if isinstance(output, torch.Tensor):
            sizes.append(output.numel())

    hooks = [m.register_forward_hook(record) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            out = model(torch.rand(2, *shape, device=device), y=torch.zeros(2, dtype=torch.long, device=device))
    except RuntimeError as err:
        raise ConfigError(f"model does not fit images of shape {shape}: {str(err).splitlines()[0]}") from None
    finally:
        for hook in hooks:
            hook.remove()
    if out.params.shape[1:] != torch.Size(shape):
        raise ConfigError(f"decoder returns {tuple(out.params.shape[1:])} for images of shape {shape}")
    # Per example activations x batch x 4 bytes, twice: autograd keeps them and their gradients.
    activation_mb = sum(sizes) / 2 * batch_size * 4 * 2 / 2**20
    n_params = sum(p.numel() for p in model.parameters())
    free = _available_mb(device)
    needed = activation_mb + n_params * 4 * 4 / 2**20  # weights, grads and two Adam moments
    if free is not None and needed > 0.8 * free:
        raise ConfigError(f"one batch needs about {needed:.0f} MB ({n_params:,} parameters, "
                          f"train.batch_size={batch_size}) but {device} has {free:.0f} MB free; "
                          "lower train.batch_size or the model size")
    return Preflight(n_params=n_params, activation_mb=activation_mb, device_free_mb=free)



__all__ = ["Preflight", "check"]
