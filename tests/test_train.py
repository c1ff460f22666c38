from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.conftest import make_idx_folder, tiny_run
from vaelab.checkpoint import load_checkpoint, save_checkpoint
from vaelab.data import load_data
from vaelab.evaluation.estimators import split_terms
from vaelab.evaluation.stage import quiet_test_metrics
from vaelab.registry import ARCHITECTURES, LIKELIHOODS
from vaelab.spec import with_values
from vaelab.training import NonFiniteLossError, fit, init_model


def train_once(root: Path, **sections):
    run = tiny_run(root, **sections)
    data = load_data(run.data, torch.device("cpu"))
    model = init_model(run, data.shape, torch.device("cpu"))
    seen: list[int] = []
    result = fit(run, model, data, callbacks=[lambda epoch, _: seen.append(epoch)], show_progress=False)
    return run, data, model, result, seen


def test_same_seed_same_metrics_different_seed_differs(mnist_root: Path):
    _, _, model_a, first, _ = train_once(mnist_root)
    _, _, model_b, second, _ = train_once(mnist_root)
    _, _, _, other, _ = train_once(mnist_root, train={"seed": 1})
    strip = [{k: v for k, v in h.items() if not k.startswith("time/")} for h in first.history]
    assert strip == [{k: v for k, v in h.items() if not k.startswith("time/")} for h in second.history]
    for key, value in model_a.state_dict().items():
        assert torch.equal(value, model_b.state_dict()[key])
    assert other.history[-1]["train/loss"] != first.history[-1]["train/loss"]


def test_training_lowers_the_loss_and_calls_back_every_epoch(mnist_root: Path):
    _, _, _, result, seen = train_once(mnist_root, train={"epochs": 4, "patience": None})
    assert seen == [1, 2, 3, 4]
    losses = [h["train/loss"] for h in result.history]
    assert losses[-1] < losses[0]
    expected = {"train/loss", "train/recon", "train/kl", "train/elbo", "val/loss", "val/recon", "val/kl",
                "val/elbo", "val/mse", "time/epoch_s"}
    assert expected <= set(result.history[0])
    h = result.history[0]
    assert h["train/elbo"] == pytest.approx(h["train/recon"] + h["train/kl"])


def test_early_stopping_restores_the_best_weights(tmp_path: Path):
    # 40 training images and a big model overfit within a few epochs.
    root = make_idx_folder(tmp_path / "small", n_train=80, n_test=20)
    run, data, model, result, _ = train_once(
        root, data={"val_fraction": 0.5}, model={"hidden": (256,), "z_dim": 16},
        train={"epochs": 200, "patience": 2, "batch_size": 8, "lr": 3e-3},
    )
    assert result.stopped_early
    assert result.epochs_run == result.best_epoch + 2
    val_losses = [h["val/loss"] for h in result.history]
    assert result.best_val_loss == min(val_losses)
    gen = torch.Generator().manual_seed(run.train.seed + 2)  # the validation draws fit() uses
    now = split_terms(model, data.val, model.likelihood, run.loss.beta, run.eval.batch_size, gen)
    assert now["loss"] == pytest.approx(result.best_val_loss, rel=1e-5)


def test_non_finite_loss_stops_with_a_reason(mnist_root: Path):
    run = tiny_run(mnist_root)
    data = load_data(run.data, torch.device("cpu"))
    model = init_model(run, data.shape, torch.device("cpu"))
    with torch.no_grad():  # images are bytes and cannot be NaN: a poisoned weight is
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="non-finite train/loss.*epoch 1"):
        fit(run, model, data, show_progress=False)


@pytest.mark.parametrize("likelihood", sorted(LIKELIHOODS))
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_and_likelihood_trains_one_epoch(arch, likelihood, mnist_root: Path, tmp_path: Path):
    run = tiny_run(mnist_root, model={"arch": arch}, loss={"likelihood": likelihood}, train={"epochs": 1})
    data = load_data(run.data, torch.device("cpu"))
    model = init_model(run, data.shape, torch.device("cpu"))
    result = fit(run, model, data, show_progress=False)
    assert math.isfinite(result.history[0]["val/elbo"])
    metrics = quiet_test_metrics(model, data, with_values(run, {"eval.iw_samples": 4}))
    assert math.isfinite(metrics["test/nll_iw"]) and metrics["test/nll_iw"] <= metrics["test/elbo"] + 5
    # The checkpoint carries everything the likelihood learned.
    loaded = load_checkpoint(save_checkpoint(tmp_path / "ckpt", model, run, "matrix", metrics))
    again = quiet_test_metrics(loaded.model, data, run)
    assert again["test/elbo"] == pytest.approx(metrics["test/elbo"], rel=1e-6)


@pytest.mark.parametrize(("schedule", "logged"), [("linear", "train/kl_weight"), ("cyclical", "train/kl_weight"),
                                                  ("capacity", "train/capacity")])
def test_schedules_train_and_log_their_weight(schedule, logged, mnist_root: Path):
    _, _, _, result, _ = train_once(mnist_root, loss={"kl_schedule": schedule, "warmup_epochs": 2.0,
                                                      "capacity_epochs": 2.0, "cycles": 1, "free_bits": 0.1},
                                    train={"epochs": 4, "patience": None})
    values = [h[logged] for h in result.history]
    assert values[0] < values[1] <= values[2]  # each ramps up over the first two epochs
    assert all(math.isfinite(h["train/loss"]) for h in result.history)


def test_dynamic_binarization_resamples_training_pixels(mnist_root: Path):
    run = tiny_run(mnist_root, data={"binarize": "dynamic"})
    data = load_data(run.data, torch.device("cpu"))
    assert data.dynamic_binarize
    assert set(data.test.x[:].unique().tolist()) == {0.0, 1.0} and set(data.val.x[:].unique().tolist()) == {0.0, 1.0}
    assert len(data.train.x[:].unique()) > 2  # kept grey: the loop samples bits per batch
    again = load_data(run.data, torch.device("cpu"))
    assert torch.equal(again.test.x[:], data.test.x[:])  # the evaluation bits are fixed
    static = load_data(tiny_run(mnist_root, data={"binarize": "static"}).data, torch.device("cpu"))
    assert set(static.train.x[:].unique().tolist()) == {0.0, 1.0} and not static.dynamic_binarize
    model = init_model(run, data.shape, torch.device("cpu"))
    result = fit(run, model, data, show_progress=False)
    assert math.isfinite(result.history[-1]["val/elbo"])
