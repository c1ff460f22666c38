"""Priors and layer kinds (model.prior, model.hidden_act): the VampPrior (Tomczak & Welling 2018) against
known answers (its density integrates to 1, it is N(0, I) when its one component is, its samples follow its
density), the gated layer (Dauphin et al. 2017) and the weights' names, the spec refusals of the new keys,
and the identities of runs that do not use them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from vaelab.checkpoint import weights_digest
from vaelab.checks import SpecError
from vaelab.cli import main
from vaelab.models.build import build_model
from vaelab.models.gated import GatedDense
from vaelab.models.priors.gaussian import StandardNormal
from vaelab.models.priors.vamp import VampPrior
from vaelab.spec import RunSpec, parse_spec, with_values

SHAPE = (1, 4, 4)


def vamp_model(z_dim: int, components: int = 3, seed: int = 0, **model) -> nn.Module:
    """A tiny float64 VAE with a VampPrior whose components are spread apart (pseudo-inputs uniform in
    [0, 1], the means' half of the encoder's head scaled up), so the mixture is not one Gaussian."""
    run = with_values(RunSpec(), {"model.hidden": [8], "model.z_dim": z_dim, "model.prior": "vamp",
                                  "model.prior_components": components,
                                  **{f"model.{k}": v for k, v in model.items()}})
    torch.manual_seed(seed)
    vae = build_model(run, SHAPE).double()
    with torch.no_grad():
        vae.prior.pseudo_inputs.uniform_(0.0, 1.0)
        vae.encoder.head.weight[: vae.z_dim].mul_(20.0)  # (mu, logvar) = head(h).chunk(2)
        vae.encoder.head.weight[vae.z_dim :].mul_(3.0)  # components of unlike widths
        if hasattr(vae, "encoder2"):  # two levels: the prior's components are q(z2 | z1)'s
            vae.encoder2.head.weight[: vae.top_dim].mul_(20.0)
    return vae.eval()


def box(vae: nn.Module, sigmas: float = 12.0) -> tuple[float, float]:
    """A range that holds every component of the mixture to `sigmas` standard deviations, and its smallest one."""
    with torch.no_grad():
        mu, logvar = vae.prior.components(vae)
    std = torch.exp(0.5 * logvar)
    return float((mu.abs() + sigmas * std).max()), float(std.min())


@pytest.mark.parametrize(("z_dim", "levels"), [(1, 1), (2, 1), (2, 2)], ids=["1 dim", "2 dims", "two-level top"])
def test_the_vampprior_density_integrates_to_one(z_dim: int, levels: int):
    vae = vamp_model(z_dim, levels=levels, z2_dim=z_dim)
    half, smallest = box(vae)
    points = 20_001 if vae.top_dim == 1 else 1201
    grid = torch.linspace(-half, half, points, dtype=torch.float64)
    assert float(grid[1] - grid[0]) < smallest / 3  # fine enough for the narrowest component
    with torch.no_grad():
        if vae.top_dim == 1:
            density = vae.prior.log_prob(grid[:, None], vae).exp()
            total = torch.trapezoid(density, grid)
        else:
            z = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), dim=-1)  # (P, P, 2)
            density = vae.prior.log_prob(z, vae).exp()
            total = torch.trapezoid(torch.trapezoid(density, grid, dim=1), grid)
        mu, _ = vae.prior.components(vae)
    assert float(total) == pytest.approx(1.0, abs=1e-4)
    assert float(mu.std(0).min()) > 0.3  # the components are apart: this is a mixture, not one Gaussian


def test_with_one_standard_normal_component_the_monte_carlo_kl_is_the_closed_form():
    """Pseudo-input 0 (hardtanh of -1) through an encoder without biases gives q(z|u) = N(0, I): the VampPrior is
    then N(0, I), and the Monte Carlo KL's mean over many samples is the closed-form KL of each image."""
    vae = vamp_model(3, components=1)
    with torch.no_grad():
        for module in vae.encoder.modules():
            if isinstance(module, nn.Linear):
                module.bias.zero_()
        vae.prior.pseudo_inputs.fill_(-1.0)
        mu, logvar = vae.prior.components(vae)
        assert torch.equal(mu, torch.zeros_like(mu)) and torch.equal(logvar, torch.zeros_like(logvar))
        z = torch.randn(50, 3, dtype=torch.float64)
        torch.testing.assert_close(vae.prior.log_prob(z, vae), StandardNormal().log_prob(z))

        x = torch.rand(6, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        samples = 40_000
        noise = torch.randn(samples, len(x), vae.noise_dim, generator=torch.Generator().manual_seed(2),
                            dtype=torch.float64)
        out = vae(x, noise=noise)
    exact = StandardNormal().kl_dims(out.mu, out.logvar).sum(1)
    assert float(exact.min()) > 0.5  # the posteriors are not the prior: there is a KL to find
    standard_error = out.log_ratio.std(0) / math.sqrt(samples)
    assert out.kl.shape == (len(x), 1)
    assert (out.kl[:, 0] - exact).abs().le(4 * standard_error + 1e-9).all(), (out.kl[:, 0], exact)


def test_samples_from_the_vampprior_follow_its_density():
    n = 40_000
    # One dimension: the samples' distribution function against the density's, integrated (Kolmogorov-Smirnov).
    vae = vamp_model(1, components=4)
    half, _ = box(vae)
    with torch.no_grad():
        samples = vae.sample_codes(n, torch.Generator().manual_seed(3), torch.device("cpu"))[:, 0].sort().values
        grid = torch.linspace(-half, half, 40_001, dtype=torch.float64)
        cdf = torch.cumulative_trapezoid(vae.prior.log_prob(grid[:, None], vae).exp(), grid)
    at_samples = np.interp(samples.numpy(), grid[1:].numpy(), cdf.numpy())
    empirical = np.arange(1, n + 1) / n
    distance = max(np.abs(empirical - at_samples).max(), np.abs(empirical - 1 / n - at_samples).max())
    assert distance < 1.95 / math.sqrt(n)  # the KS test's 0.1 % critical value

    # Two dimensions: mean and covariance against the mixture's, (1/K) sum_k mu_k and (1/K) sum_k (S_k + mu_k mu_k^T)
    # less the mean's outer product.
    vae = vamp_model(2, components=5, seed=1)
    with torch.no_grad():
        z = vae.sample_codes(n, torch.Generator().manual_seed(4), torch.device("cpu"))
        mu, logvar = vae.prior.components(vae)
    mean = mu.mean(0)
    second = (torch.diag_embed(logvar.exp()) + mu[:, :, None] * mu[:, None, :]).mean(0)
    covariance = second - mean[:, None] * mean[None, :]
    standard_error = covariance.diagonal().sqrt() / math.sqrt(n)
    assert (z.mean(0) - mean).abs().le(4 * standard_error).all()
    torch.testing.assert_close(torch.cov(z.T), covariance, rtol=0.05, atol=0.05 * float(covariance.diagonal().max()))


def test_the_gated_layer_is_a_linear_map_times_a_sigmoid_gate():
    torch.manual_seed(0)
    layer = GatedDense(3, 2)
    x = torch.randn(5, 3)
    h = x @ layer.h.weight.T + layer.h.bias
    g = x @ layer.g.weight.T + layer.g.bias
    torch.testing.assert_close(layer(x), h * (1 / (1 + torch.exp(-g))))


def test_a_gated_mlp_names_its_weights_by_layer_and_part():
    run = with_values(RunSpec(), {"model.hidden": [16, 8], "model.z_dim": 3, "model.hidden_act": "gated"})
    names = list(build_model(run, SHAPE).state_dict())
    layers = [f"{side}.body.{i}.{part}.{p}" for side in ("encoder",) for i in (0, 1) for part in ("h", "g")
              for p in ("weight", "bias")]
    decoder = [name.replace("encoder", "decoder") for name in layers]
    assert names == ["n_classes", *layers, "encoder.head.weight", "encoder.head.bias",
                     *decoder, "decoder.head.weight", "decoder.head.bias"]
    assert build_model(run, SHAPE).encoder.body[0].h.weight.shape == (16, 16)  # 4 x 4 pixels in, 16 out


# The relu MLP's weights as commit a0f477a (before model.hidden_act) built them with torch.manual_seed(0): the same
# names, the same numbers, so older checkpoints load and the same spec starts from the same weights.
RELU_NAMES_BEFORE = ["n_classes", "encoder.body.0.weight", "encoder.body.0.bias", "encoder.body.2.weight",
                     "encoder.body.2.bias", "encoder.head.weight", "encoder.head.bias", "decoder.body.0.weight",
                     "decoder.body.0.bias", "decoder.body.2.weight", "decoder.body.2.bias", "decoder.head.weight",
                     "decoder.head.bias"]
RELU_DIGEST_BEFORE = "7b0b424239afbfccc98ad0aae55ed3958afc05e07759691cf34246d68fd81692"


def test_relu_and_tanh_mlps_keep_the_weights_and_names_of_before():
    run = with_values(RunSpec(), {"model.hidden": [16, 8], "model.z_dim": 3})
    torch.manual_seed(0)
    relu = build_model(run, (1, 28, 28))
    assert list(relu.state_dict()) == RELU_NAMES_BEFORE
    assert weights_digest(relu.state_dict()) == RELU_DIGEST_BEFORE
    tanh = build_model(with_values(run, {"model.hidden_act": "tanh"}), (1, 28, 28))
    assert list(tanh.state_dict()) == RELU_NAMES_BEFORE
    assert isinstance(tanh.encoder.body[1], nn.Tanh) and isinstance(relu.encoder.body[1], nn.ReLU)


@pytest.mark.parametrize(("model", "loss", "key"), [
    ({"arch": "conv", "levels": 2}, {}, "model.levels"),
    ({"prior": "vamp", "conditional": True}, {}, "model.conditional"),
    ({"levels": 2, "conditional": True}, {}, "model.conditional"),
    ({"prior": "vamp"}, {"free_bits": 0.5}, "loss.free_bits"),
    ({"levels": 2}, {"free_bits": 0.5}, "loss.free_bits"),
    ({"prior": "vamp"}, {"objective": "beta_tcvae"}, "loss.objective"),
], ids=["levels 2 conv", "vamp conditional", "levels 2 conditional", "vamp free_bits", "levels 2 free_bits",
        "vamp beta_tcvae"])
def test_settings_the_new_keys_cannot_take_are_refused_in_one_line_by_key(model, loss, key, tmp_path, capsys):
    raw = {"name": "refused", "base": {"data": {"dataset": "mnist", "download": False}, "model": model, "loss": loss}}
    with pytest.raises(SpecError) as err:
        parse_spec(raw)
    assert str(err.value).startswith(f"{key}: ") and "\n" not in str(err.value)
    spec = tmp_path / "refused.yaml"
    spec.write_text(yaml.safe_dump(raw))
    assert main(["train", str(spec), "--dry-run"]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and said[0].startswith(f"vaelab: error: {key}: ")


# RunSpec.hash of these runs at commit a0f477a, before model.prior, prior_components, hidden_act, levels, z2_dim
# and hidden2 existed.
HASHES_BEFORE = {
    "default": "4296fc5ce781dfc8",
    "mlp hidden [300, 300] z 40": "514f2a02480e97f3",
    "conv z 16": "8a4322a2111f85c0",
    "beta_tcvae": "57cbe90bb521250f",
}
RUNS = {
    "default": {},
    "mlp hidden [300, 300] z 40": {"model.hidden": [300, 300], "model.z_dim": 40},
    "conv z 16": {"model.arch": "conv", "model.z_dim": 16},
    "beta_tcvae": {"loss.objective": "beta_tcvae"},
}
NEUTRAL = {"model.prior": "gaussian", "model.levels": 1, "model.hidden_act": "relu"}


def test_runs_at_the_new_keys_neutral_values_keep_their_identity_and_others_get_their_own():
    for name, values in RUNS.items():
        run = with_values(RunSpec(), values)
        assert run.hash() == HASHES_BEFORE[name], name
        assert with_values(run, NEUTRAL).hash() == HASHES_BEFORE[name], name
        # keys the run does not use leave it as it was
        unused = {"model.prior_components": 50, "model.z2_dim": 7, "model.hidden2": [5]}
        assert with_values(run, unused).hash() == HASHES_BEFORE[name], name
    written = parse_spec({"name": "n", "base": {"model": {"prior": "gaussian", "levels": 1, "hidden_act": "relu"}}})
    assert written.base.hash() == HASHES_BEFORE["default"]

    default = RunSpec()
    vamp = with_values(default, {"model.prior": "vamp"})
    two = with_values(default, {"model.levels": 2})
    changed = [vamp, two, with_values(default, {"model.hidden_act": "gated"}),
               with_values(vamp, {"model.prior_components": 50}), with_values(two, {"model.z2_dim": 7}),
               with_values(two, {"model.hidden2": [5]})]
    assert len({run.hash() for run in [default, *changed]}) == 1 + len(changed)
    conv = with_values(default, RUNS["conv z 16"])  # an MLP's layer kind is no part of a conv run
    assert with_values(conv, {"model.hidden_act": "gated"}).hash() == HASHES_BEFORE["conv z 16"]


def test_the_prior_records_build_what_their_names_say():
    assert isinstance(build_model(RunSpec(), SHAPE).prior, StandardNormal)
    vamp = build_model(with_values(RunSpec(), {"model.prior": "vamp", "model.prior_components": 7,
                                               "model.hidden": [8]}), SHAPE)
    assert isinstance(vamp.prior, VampPrior) and vamp.prior.pseudo_inputs.shape == (7, *SHAPE)
    assert not vamp.per_dimension_kl and vamp.prior.kl_dims(torch.zeros(2, 3), torch.zeros(2, 3)) is None
