"""Residual encoder and decoder: stride-2 residual stages (He et al. 2016) that
halve, then double, the image side. No normalisation layers, so train and eval
modes compute the same function and small batches are fine."""

from __future__ import annotations

import math

from torch import Tensor, nn

from vaelab.models.conv import _check_side, stage_channels


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with a skip; `resample` is 'down' (stride 2), 'up' (x2) or None."""

    def __init__(self, n_in: int, n_out: int, resample: str | None):
        super().__init__()
        self.resize = {"down": nn.AvgPool2d(2), "up": nn.Upsample(scale_factor=2, mode="nearest"),
                       None: nn.Identity()}[resample]
        self.body = nn.Sequential(
            nn.ReLU(), nn.Conv2d(n_in, n_out, 3, padding=1), nn.ReLU(), nn.Conv2d(n_out, n_out, 3, padding=1))
        self.skip = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.resize(x)
        return self.skip(x) + self.body(x)


class ResNetEncoder(nn.Module):
    def __init__(self, shape: tuple[int, int, int], z_dim: int, channels: tuple[int, ...]):
        super().__init__()
        small_h, small_w = _check_side(shape, len(channels))
        blocks: list[nn.Module] = [nn.Conv2d(shape[0], channels[0], 3, padding=1)]
        n_in = channels[0]
        for n_out in channels:
            blocks.append(ResidualBlock(n_in, n_out, "down"))
            n_in = n_out
        self.body = nn.Sequential(*blocks, nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(n_in * small_h * small_w, 2 * z_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.head(self.body(x)).chunk(2, dim=1)
        return mu, logvar


class ResNetDecoder(nn.Module):
    def __init__(self, shape: tuple[int, int, int], z_dim: int, channels: tuple[int, ...]):
        super().__init__()
        small_h, small_w = _check_side(shape, len(channels))
        widths = list(reversed(channels))
        self.start = (widths[0], small_h, small_w)
        self.project = nn.Linear(z_dim, math.prod(self.start))
        blocks = [ResidualBlock(n_in, n_out, "up") for n_in, n_out in zip(widths, [*widths[1:], widths[-1]],
                                                                            strict=True)]
        self.body = nn.Sequential(*blocks, nn.ReLU(), nn.Conv2d(widths[-1], shape[0], 3, padding=1))

    def forward(self, z: Tensor) -> Tensor:
        return self.body(self.project(z).view(-1, *self.start))


def build_resnet(shape: tuple[int, int, int], model_spec) -> tuple[nn.Module, nn.Module]:
    channels = stage_channels(shape, model_spec.channels)
    return ResNetEncoder(shape, model_spec.z_dim, channels), ResNetDecoder(shape, model_spec.z_dim, channels)
