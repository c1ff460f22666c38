from __future__ import annotations

import dataclasses

import pytest
import torch

from vaelab.likelihoods import Bernoulli
from vaelab.models import ConfigError
from vaelab.models.build import build_model
from vaelab.models.conv import stage_channels
from vaelab.objectives import vae_terms
from vaelab.registry import ARCHITECTURES
from vaelab.spec import RunSpec


def run_with(arch: str, z_dim: int = 6) -> RunSpec:
    base = RunSpec()
    return dataclasses.replace(base, model=dataclasses.replace(base.model, arch=arch, z_dim=z_dim, hidden=(64,)))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_shapes(arch):
    model = build_model(run_with(arch), (1, 28, 28))
    x = torch.rand(5, 1, 28, 28)
    out = model(x)
    assert out.params.shape == x.shape
    assert out.mu.shape == out.logvar.shape == out.z.shape == (5, 6)
    assert model.decode(torch.zeros(2, 6)).shape == (2, 1, 28, 28)


def test_default_mlp_is_the_canonical_784_400_20():
    model = build_model(RunSpec(), (1, 28, 28))
    sizes = [(m.in_features, m.out_features) for m in model.encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert sizes == [(784, 400), (400, 40)]  # 40 = mean and log-variance of 20 dims


def test_conv_rejects_sides_it_cannot_halve():
    base = run_with("conv")
    spec = dataclasses.replace(base, model=dataclasses.replace(base.model, channels=(8, 8, 8)))
    with pytest.raises(ConfigError, match="model.channels"):
        build_model(spec, (1, 28, 28))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_one_optimiser_step_changes_every_weight(arch):
    torch.manual_seed(0)
    model = build_model(run_with(arch), (1, 28, 28))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(8, 1, 28, 28)
    out = model(x)
    vae_terms(x, out.params, out.kl, Bernoulli(), 1.0).loss.mean().backward()
    optimizer.step()
    unchanged = [k for k, v in model.named_parameters() if torch.equal(v, before[k])]
    assert unchanged == []


@pytest.mark.parametrize(("shape", "expected"), [
    ((1, 28, 28), (32, 64)), ((3, 64, 64), (32, 64, 128, 256)), ((3, 96, 96), (32, 64, 128, 256)),
    ((3, 512, 512), (32, 64, 128, 256, 512, 512)), ((1, 30, 30), (32,)),
])
def test_conv_depth_follows_the_image_size(shape, expected):
    assert stage_channels(shape, None) == expected
    assert stage_channels(shape, (8, 16)) == (8, 16)


@pytest.mark.parametrize("arch", ["conv", "resnet"])
@pytest.mark.parametrize("side", [64, 128])
def test_convolutional_models_at_larger_sizes(arch, side):
    base = RunSpec()
    spec = dataclasses.replace(base, model=dataclasses.replace(base.model, arch=arch, z_dim=8))
    model = build_model(spec, (3, side, side))
    x = torch.rand(2, 3, side, side)
    assert model(x).params.shape == x.shape
