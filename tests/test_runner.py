"""A whole tracked run against a real MLflow SQLite store in a temporary folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.conftest import tiny_run
from vaelab.checkpoint import load_checkpoint
from vaelab.data import load_data
from vaelab.evaluation.stage import quiet_test_metrics
from vaelab.runner import run
from vaelab.spec import flatten, unused_keys
from vaelab.tracking import FAILURE_TAG, Tracker, local_path

FIGURES = {"reconstructions.png", "samples.png", "interpolation.png", "tsne.png", "learning_curves.png",
           "kl_per_dimension.png", "traversals.png"}


@pytest.fixture
def finished(mnist_root: Path, tracking_uri: str):
    spec = tiny_run(mnist_root, train={"epochs": 3, "patience": None})
    outcome = run(spec, "unit", Tracker(tracking_uri), show_progress=False)
    return spec, outcome, MlflowClient(tracking_uri)


def test_run_records_params_metrics_and_status(finished):
    spec, outcome, client = finished
    record = client.get_run(outcome.run_id)
    assert record.info.status == "FINISHED"
    assert client.get_experiment(record.info.experiment_id).name == "unit"
    params = record.data.params
    flat = flatten(spec)
    # Every key the run uses is a param; the rest (loss.sigma of a Bernoulli run, ...) are named in one tag.
    unused = set(record.data.tags["vaelab.params_not_used"].split(", "))
    assert set(params) == set(flat) - unused and unused == unused_keys(spec)
    assert "loss.sigma" in unused and "loss.beta" in params
    assert params["model.z_dim"] == "4" and params["data.dataset"] == "mnist"
    for key in ("test/elbo", "test/recon", "test/kl", "test/mse", "test/active_units"):
        assert key in record.data.metrics
    m = record.data.metrics
    assert m["test/elbo"] == pytest.approx(m["test/recon"] + m["test/kl"], rel=1e-6)
    history = client.get_metric_history(outcome.run_id, "val/loss")
    assert [h.step for h in history] == [1, 2, 3]
    assert len(client.get_metric_history(outcome.run_id, "time/epoch_s")) == 3
    assert record.data.tags["vaelab.run_hash"] == spec.hash()


def test_run_stores_valid_figures_and_a_checkpoint(finished):
    _, outcome, client = finished
    names = {a.path for a in client.list_artifacts(outcome.run_id, "figures")}
    assert {f"figures/{name}" for name in FIGURES} == names
    folder = local_path(outcome.artifact_uri) / "figures"
    for name in FIGURES:
        with Image.open(folder / name) as image:
            image.verify()
            assert image.format == "PNG"
    assert {a.path for a in client.list_artifacts(outcome.run_id, "checkpoint")} == {
        "checkpoint/model.pt", "checkpoint/spec.yaml", "checkpoint/metrics.json", "checkpoint/run.json"}


def test_checkpoint_reloads_to_the_same_test_metrics(finished):
    spec, outcome, _ = finished
    checkpoint = load_checkpoint(outcome.checkpoint_dir)
    assert checkpoint.run_spec == spec
    assert checkpoint.name == "unit"
    data = load_data(spec.data, torch.device("cpu"))
    again = quiet_test_metrics(checkpoint.model, data, spec, epochs_run=outcome.epochs_run)
    for key, value in again.items():
        assert value == pytest.approx(outcome.metrics[key], rel=1e-5), key
    assert checkpoint.metrics["test/elbo"] == pytest.approx(outcome.metrics["test/elbo"])


def test_failed_run_is_marked_failed_with_its_reason(mnist_root: Path, tracking_uri: str):
    # A tiny fixed sigma overflows the squared error: the loss is inf at once.
    spec = tiny_run(mnist_root, loss={"likelihood": "gaussian", "sigma": 1e-300})
    with pytest.raises(Exception, match="non-finite"):
        run(spec, "unit", Tracker(tracking_uri), show_progress=False)
    client = MlflowClient(tracking_uri)
    [record] = client.search_runs([client.get_experiment_by_name("unit").experiment_id])
    assert record.info.status == "FAILED"
    assert "non-finite" in record.data.tags[FAILURE_TAG]


def test_bad_data_creates_no_run(tmp_path: Path, tracking_uri: str):
    spec = tiny_run(tmp_path / "no-such-folder")
    with pytest.raises(Exception, match="IDX files not found"):
        run(spec, "unit", Tracker(tracking_uri), show_progress=False)
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("unit")
    assert experiment is None or client.search_runs([experiment.experiment_id]) == []
