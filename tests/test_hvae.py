"""Two stochastic layers (model.levels: 2, vaelab.models.hvae; Burda et al. 2016, section 5): the model
the spec builds, its log weight against the four densities written out, its IWAE estimate against its
ELBO, checkpoints, stacked training, and `vaelab train --no-track` runs with the VampPrior, two levels
and both, figures on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch.distributions import Normal

from tests.conftest import tiny_run
from vaelab import load
from vaelab.checkpoint import load_checkpoint, save_checkpoint
from vaelab.cli import main
from vaelab.data import load_data
from vaelab.evaluation.estimators import importance_weighted_nll
from vaelab.models.build import build_model
from vaelab.models.hvae import HierarchicalVAE
from vaelab.models.vae import log_weights
from vaelab.spec import RunSpec, with_values
from vaelab.training import fit, fit_stack, init_model, stack_blocker

CPU = torch.device("cpu")
SHAPE = (1, 28, 28)


def two_level(**values) -> RunSpec:
    return with_values(RunSpec(), {"model.levels": 2, "model.z_dim": 4, "model.hidden": [32],
                                   **{f"model.{k}": v for k, v in values.items()}})


def test_the_spec_builds_z2_over_z1_with_the_one_level_models_x_blocks():
    model = build_model(two_level(z2_dim=3, hidden2=[16, 8], hidden_act="tanh"), SHAPE)
    assert isinstance(model, HierarchicalVAE)
    assert (model.z_dim, model.z2_dim, model.noise_dim, model.top_dim) == (4, 3, 7, 3)
    assert not model.per_dimension_kl
    one_level = build_model(with_values(two_level(), {"model.levels": 1, "model.hidden_act": "tanh"}), SHAPE)
    x_blocks = {k: v.shape for k, v in model.state_dict().items() if k.startswith(("encoder.", "decoder."))}
    assert x_blocks == {k: v.shape for k, v in one_level.state_dict().items() if k != "n_classes"}
    # z1 -> 16 -> 8 -> (mu, logvar) of z2, and back: z2 -> 8 -> 16 -> (mu, logvar) of z1
    assert [m.weight.shape for m in model.encoder2.modules() if isinstance(m, torch.nn.Linear)] == [
        (16, 4), (8, 16), (6, 8)]
    assert [m.weight.shape for m in model.decoder2.modules() if isinstance(m, torch.nn.Linear)] == [
        (8, 3), (16, 8), (8, 16)]
    assert isinstance(model.encoder2.body[1], torch.nn.Tanh)
    defaults = build_model(two_level(), SHAPE)  # z2_dim and hidden2 null: z_dim and hidden
    assert defaults.z2_dim == 4 and defaults.encoder2.body[0].weight.shape == (32, 4)


@pytest.mark.parametrize("prior", ["gaussian", "vamp"])
def test_the_log_ratio_is_the_four_densities_of_the_paper(prior: str):
    """log q(z1|x) + log q(z2|z1) - log p(z1|z2) - log p(z2) (Burda et al. 2016, section 5), each density from
    torch.distributions, at the codes the noise gives; the decoder sees z1."""
    torch.manual_seed(0)
    model = build_model(two_level(z2_dim=3, prior=prior, prior_components=4), SHAPE).double()
    x = torch.rand(5, *SHAPE, dtype=torch.float64)
    noise = torch.randn(7, 5, model.noise_dim, dtype=torch.float64)
    with torch.no_grad():
        mu, logvar = model.encode(x)
        params, z, log_ratio = model.latent_pass(mu, logvar, noise)
        z1 = mu + noise[..., :4] * (0.5 * logvar).exp()
        mu2, logvar2 = model.encoder2(z1)
        z2 = mu2 + noise[..., 4:] * (0.5 * logvar2).exp()
        pmu1, plogvar1 = model.decoder2(z2)
        if prior == "gaussian":
            log_p2 = Normal(0.0, 1.0).log_prob(z2).sum(-1)
        else:  # the mixture of q(z2 | z1 = mean of q(z1|u_k)) over the pseudo-inputs u_k
            cmu, clogvar = model.encoder2(model.encode(model.prior.pseudo_inputs.clamp(0, 1))[0])
            log_p2 = Normal(cmu, (0.5 * clogvar).exp()).log_prob(z2[..., None, :]).sum(-1).logsumexp(-1) - math.log(4)
        expected = (Normal(mu, (0.5 * logvar).exp()).log_prob(z1).sum(-1)
                    + Normal(mu2, (0.5 * logvar2).exp()).log_prob(z2).sum(-1)
                    - Normal(pmu1, (0.5 * plogvar1).exp()).log_prob(z1).sum(-1) - log_p2)
        torch.testing.assert_close(z, z1)
        torch.testing.assert_close(log_ratio, expected)
        torch.testing.assert_close(params, model.decode(z1.flatten(0, 1)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple:
    """A two-level model with a VampPrior, trained three epochs on the small IDX files, and its data."""
    from tests.conftest import make_idx_folder

    root = make_idx_folder(tmp_path_factory.mktemp("idx") / "mnist")
    run = tiny_run(root, train={"epochs": 3, "patience": None},
                   model={"levels": 2, "z2_dim": 3, "prior": "vamp", "prior_components": 10})
    data = load_data(run.data, CPU)
    model = init_model(run, data.shape, CPU)
    result = fit(run, model, data, show_progress=False)
    return run, model, data, result


def test_the_iwae_estimate_of_a_two_level_model_is_no_worse_than_its_elbo(trained):
    run, model, data, _ = trained
    x = data.test.x[:80]
    model.eval()
    with torch.inference_mode():
        # One sample per image: the estimator's k = 1 is the ELBO of the same draw, image by image.
        elbo = model(x, generator=torch.Generator().manual_seed(5))
        neg_elbo = -log_weights(model.likelihood, x, elbo.params, elbo.log_ratio)[0]
        one = importance_weighted_nll(model, x, model.likelihood, 1, torch.Generator().manual_seed(5))
        torch.testing.assert_close(one, neg_elbo, rtol=1e-5, atol=1e-3)
        # The expected -ELBO (20 draws per image) against the k-sample estimates: no worse, and tighter with k.
        noise = torch.randn(20, len(x), model.noise_dim, generator=torch.Generator().manual_seed(6))
        many = model(x, noise=noise)
        mean_neg_elbo = -log_weights(model.likelihood, x, many.params, many.log_ratio).mean(0)
        estimates = {k: importance_weighted_nll(model, x, model.likelihood, k, torch.Generator().manual_seed(7))
                     for k in (8, 64)}
    gap = mean_neg_elbo - estimates[64]
    assert float(gap.mean()) > 3 * float(gap.std()) / math.sqrt(len(x)) > 0, (gap.mean(), gap.std())
    assert float(estimates[8].mean()) >= float(estimates[64].mean())
    assert math.isfinite(float(estimates[64].mean()))


def test_a_two_level_checkpoint_rebuilds_the_same_model(trained, tmp_path: Path):
    run, model, data, _ = trained
    folder = save_checkpoint(tmp_path / "ckpt", model, run, "hvae", {"test/elbo": 1.0}, run_id="r1")
    loaded = load_checkpoint(folder)
    assert isinstance(loaded.model, HierarchicalVAE) and loaded.model.z2_dim == 3
    assert set(loaded.model.state_dict()) == set(model.state_dict())
    x = data.test.x[:6]
    noise = torch.randn(6, model.noise_dim, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(x, noise=noise).log_ratio, model(x, noise=noise).log_ratio)
        codes = model.sample_codes(4, torch.Generator().manual_seed(3), CPU)
        expected = model.likelihood.mean(model.decode(codes))
    torch.testing.assert_close(load(folder).sample(4, seed=3), expected)  # ancestral: z2, then z1 | z2


def test_sampling_is_ancestral_through_p_z1_given_z2(trained):
    _, model, _, _ = trained
    generator = torch.Generator().manual_seed(9)
    with torch.inference_mode():
        z1 = model.sample_codes(5, generator, CPU)
        generator.manual_seed(9)
        z2 = model.prior.sample(5, generator, model, CPU)
        mu1, logvar1 = model.decoder2(z2)
        eps = torch.randn(mu1.shape, generator=generator)
    assert z1.shape == (5, model.z_dim)
    torch.testing.assert_close(z1, mu1 + eps * (0.5 * logvar1).exp())


def test_a_stacked_two_level_run_follows_its_single_twins(trained):
    run, _, data, result = trained
    assert stack_blocker(run) is None
    other = with_values(run, {"train.seed": 5, "train.lr": 3e-3})
    alone = fit(other, init_model(other, data.shape, CPU), data, show_progress=False)
    stacked = fit_stack([run, other], [init_model(r, data.shape, CPU) for r in (run, other)], data,
                        show_progress=False)
    for single, member in zip((result, alone), stacked, strict=True):
        assert len(member.result.history) == len(single.history) == 3
        for epoch, twin in zip(single.history, member.result.history, strict=True):
            for key in ("train/loss", "train/kl", "val/loss", "val/kl"):
                assert twin[key] == pytest.approx(epoch[key], rel=1e-5), key


@pytest.mark.parametrize("model", [
    {"prior": "vamp", "prior_components": 6},
    {"levels": 2, "z2_dim": 3, "hidden2": [16]},
    {"levels": 2, "z2_dim": 3, "prior": "vamp", "prior_components": 6, "hidden_act": "gated"},
], ids=["vamp", "levels 2", "both, gated"])
def test_vaelab_train_runs_each_model_with_figures(model: dict, mnist_root: Path, tmp_path: Path, monkeypatch,
                                                  capsys):
    monkeypatch.chdir(tmp_path)
    spec = {"name": "models_demo", "base": {
        "data": {"dataset": "mnist", "root": str(mnist_root), "download": False},
        "model": {"z_dim": 4, "hidden": [32], **model},
        "train": {"epochs": 2, "batch_size": 64, "patience": None, "device": "cpu"},
        "eval": {"tsne_points": 60, "iw_samples": 8, "probe": False}}}
    (tmp_path / "models_demo.yaml").write_text(yaml.safe_dump(spec))
    assert main(["train", "models_demo.yaml", "--no-track", "--no-progress"]) == 0
    capsys.readouterr()
    [run_folder] = [p for p in (tmp_path / "untracked" / "models_demo").iterdir() if p.name != "resume"]
    metrics = json.loads((run_folder / "checkpoint" / "metrics.json").read_text())
    assert math.isfinite(metrics["test/elbo"]) and math.isfinite(metrics["test/nll_iw"])
    assert not any(key.startswith("test/kl_dim/") for key in metrics)  # no KL per dimension to report
    assert (run_folder / "samples.png").is_file() and (run_folder / "traversals.png").is_file()
    assert main(["sample", str(run_folder / "checkpoint"), "--n", "4", "--out", str(tmp_path / "more.png")]) == 0
    assert (tmp_path / "more.png").is_file()
