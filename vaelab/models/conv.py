"""Convolutional encoder and decoder: stride-2 stages that halve (then double)
the image side, as in the DCGAN-style VAEs of PyTorch-VAE and disentanglement_lib."""

from __future__ import annotations

from torch import Tensor, nn

from vaelab.errors import ConfigError


def stage_channels(shape: tuple[int, int, int], channels: tuple[int, ...] | None) -> tuple[int, ...]:
    """The spec's channels, or (when null) one stride-2 stage per halving of the image
    side down to a 4-7 pixel grid, at most 6 stages, widths 32, 64, ... up to 512."""
    if channels:
        return tuple(channels)
    side, stages = min(shape[1:]), 0
    while side % 2 == 0 and side // 2 >= 4 and stages < 6:
        side, stages = side // 2, stages + 1
    return tuple(min(32 * 2**i, 512) for i in range(max(stages, 1)))


def _check_side(shape: tuple[int, int, int], stages: int) -> tuple[int, int]:
    _, height, width = shape
    factor = 2**stages
    if height % factor or width % factor:
        raise ConfigError(
            f"model.channels: {stages} stride-2 stages need image sides divisible by {factor}, got {height}x{width}"
        )
    return height // factor, width // factor


class ConvEncoder(nn.Module):
    def __init__(self, shape: tuple[int, int, int], z_dim: int, channels: tuple[int, ...]):
        super().__init__()
        small_h, small_w = _check_side(shape, len(channels))
        layers: list[nn.Module] = []
        n_in = shape[0]
        for n_out in channels:
            layers += [nn.Conv2d(n_in, n_out, kernel_size=4, stride=2, padding=1), nn.ReLU()]
            n_in = n_out
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(n_in * small_h * small_w, 2 * z_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.head(self.body(x)).chunk(2, dim=1)
        return mu, logvar


class ConvDecoder(nn.Module):
    def __init__(self, shape: tuple[int, int, int], z_dim: int, channels: tuple[int, ...]):
        super().__init__()
        small_h, small_w = _check_side(shape, len(channels))
        widths = list(reversed(channels))
        self.start = (widths[0], small_h, small_w)
        self.project = nn.Sequential(nn.Linear(z_dim, widths[0] * small_h * small_w), nn.ReLU())
        layers: list[nn.Module] = []
        for n_in, n_out in zip(widths, widths[1:], strict=False):
            layers += [nn.ConvTranspose2d(n_in, n_out, kernel_size=4, stride=2, padding=1), nn.ReLU()]
        layers.append(nn.ConvTranspose2d(widths[-1], shape[0], kernel_size=4, stride=2, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.body(self.project(z).view(-1, *self.start))


def build_conv(shape: tuple[int, int, int], model_spec) -> tuple[nn.Module, nn.Module]:
    channels = stage_channels(shape, model_spec.channels)
    return ConvEncoder(shape, model_spec.z_dim, channels), ConvDecoder(shape, model_spec.z_dim, channels)
