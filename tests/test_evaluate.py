"""Evaluation on a trained tiny model: the IWAE bound, active units, KL per dimension, the probe."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_idx_folder, tiny_run
from vaelab.data import load_data
from vaelab.evaluation.estimators import active_units, importance_weighted_nll, latent_means, mean_kl_per_dimension
from vaelab.evaluation.stage import quiet_test_metrics
from vaelab.spec import with_values
from vaelab.training import fit, init_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = make_idx_folder(tmp_path_factory.mktemp("idx") / "m", n_train=600, n_test=200)
    run = tiny_run(root, model={"z_dim": 6, "hidden": (64,)}, train={"epochs": 8, "patience": None})
    data = load_data(run.data, torch.device("cpu"))
    model = init_model(run, data.shape, torch.device("cpu"))
    fit(run, model, data, show_progress=False)
    return run, data, model


def test_iwae_is_below_the_elbo_and_tightens_with_k(trained):
    run, data, model = trained
    x = data.test.x
    estimates = {}
    for k in (1, 10, 100, 1000):
        generator = torch.Generator().manual_seed(0)
        estimates[k] = importance_weighted_nll(model, x, model.likelihood, k, generator, budget=4096).mean().item()
    metrics = quiet_test_metrics(model, data, run)
    # k = 1 is a one-sample ELBO: it agrees with test/elbo up to sampling noise.
    assert estimates[1] == pytest.approx(metrics["test/elbo"], rel=0.01)
    assert estimates[1000] < estimates[100] < estimates[10] < metrics["test/elbo"]



def test_chunking_does_not_change_the_estimate(trained):
    run, data, model = trained
    x = data.test.x[:30]
    small = importance_weighted_nll(model, x, model.likelihood, 64, torch.Generator().manual_seed(1), budget=50)
    large = importance_weighted_nll(model, x, model.likelihood, 64, torch.Generator().manual_seed(1),
                                    budget=10_000)
    # Different chunking draws the noise in another order, so compare the averages loosely...
    assert small.mean().item() == pytest.approx(large.mean().item(), rel=0.01)
    # ...and exactly when the chunks coincide.
    same = importance_weighted_nll(model, x, model.likelihood, 64, torch.Generator().manual_seed(1),
                                   budget=10_000)
    torch.testing.assert_close(large, same)


def test_dimensions_forced_to_the_prior_are_inactive(trained):
    run, data, model = trained
    forced = init_model(run, data.shape, torch.device("cpu"))
    forced.load_state_dict(model.state_dict())
    head = forced.encoder.head  # outputs [mu (6), logvar (6)]
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for dim in (0, 1):  # two dimensions that clearly depend on the input
            head.weight[dim] = torch.randn(head.weight.shape[1], generator=generator)
        for dim in (2, 3, 4, 5):  # mu = 0 and logvar = 0: q(z_d|x) = N(0, 1) for every x
            head.weight[dim].zero_()
            head.bias[dim].zero_()
            head.weight[6 + dim].zero_()
            head.bias[6 + dim].zero_()
    means = latent_means(forced, data.test.x, 500)
    assert active_units(means) == 2
    kl = mean_kl_per_dimension(forced, data.test.x, 500)
    assert torch.all(kl[2:] == 0) and torch.all(kl[:2] > 0)


def test_test_metrics_include_iw_bits_probe_and_kl_per_dim(trained):
    run, data, model = trained
    metrics = quiet_test_metrics(model, data, with_values(run, {"eval.iw_samples": 50, "eval.iw_images": None}))
    assert metrics["test/nll_iw"] < metrics["test/elbo"]
    assert metrics["test/bits_per_dim"] == pytest.approx(metrics["test/nll_iw"] / (784 * 0.6931471805599453))
    kl_dims = [metrics[f"test/kl_dim/{d}"] for d in range(6)]
    assert sum(kl_dims) == pytest.approx(metrics["test/kl"], rel=0.02)
    # The synthetic classes are bright squares in different places: a linear probe reads them well.
    assert metrics["test/probe_acc"] > 0.5
