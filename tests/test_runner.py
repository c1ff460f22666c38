"""A whole run (data -> fit -> evaluate -> figures -> checkpoint) through an in-memory run log: what
it records, the files it writes, how it ends. The MLflow run log's own behaviour is test_runlog's and
test_tracking's; tracked runs end to end are the CLI's, the sweeps' and the resume tests'."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import make_idx_folder, tiny_run
from vaelab.checkpoint import load_checkpoint
from vaelab.data import load_data
from vaelab.evaluation.stage import quiet_test_metrics
from vaelab.runlog import FAILURE_TAG, MemoryRuns, local_path
from vaelab.runner import run
from vaelab.spec import flatten, unused_keys

FIGURES = {"reconstructions.png", "samples.png", "interpolation.png", "tsne.png", "learning_curves.png",
           "kl_per_dimension.png", "traversals.png"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("runner")
    spec = tiny_run(make_idx_folder(root / "mnist"), train={"epochs": 3, "patience": None})
    logs = MemoryRuns(root / "runs")
    outcome = run(spec, "unit", logs, show_progress=False)
    return spec, outcome, logs.runs[outcome.run_id]


def test_run_records_params_metrics_and_status(finished):
    spec, outcome, log = finished
    assert log.status == "FINISHED" and log.experiment == "unit"
    flat = flatten(spec)
    # Every key the run uses is a param; the rest (loss.sigma of a Bernoulli run, ...) are named in one tag.
    unused = set(log.tags["vaelab.params_not_used"].split(", "))
    assert set(log.params) == set(flat) - unused and unused == unused_keys(spec)
    assert "loss.sigma" in unused and "loss.beta" in log.params
    assert log.params["model.z_dim"] == "4" and log.params["data.dataset"] == "mnist"
    m = log.latest()
    for key in ("test/elbo", "test/recon", "test/kl", "test/mse", "test/active_units"):
        assert key in m and m[key] == outcome.metrics[key]
    assert m["test/elbo"] == pytest.approx(m["test/recon"] + m["test/kl"], rel=1e-6)
    assert [step for step, _ in log.history("val/loss")] == [1, 2, 3]
    assert len(log.history("time/epoch_s")) == 3
    assert log.tags["vaelab.run_hash"] == spec.hash()
    # The test metrics belong to the kept weights' model record, READY with the checkpoint.
    [model] = log.models.values()
    assert model.status == "READY" and model.metrics["test/elbo"] == m["test/elbo"]
    assert log.tags["vaelab.model_id"] in log.models
    assert {d["context"] for d in log.datasets} == {"train", "validation", "test"}


def test_run_stores_valid_figures_and_a_checkpoint(finished):
    _, outcome, log = finished
    folder = local_path(outcome.artifact_uri)
    assert folder == log.folder.resolve()
    assert {p.name for p in (folder / "figures").iterdir()} == FIGURES
    for name in FIGURES:
        with Image.open(folder / "figures" / name) as image:
            image.verify()
            assert image.format == "PNG"
    assert {p.name for p in outcome.checkpoint_dir.iterdir()} == {"model.pt", "spec.yaml", "metrics.json",
                                                                  "run.json"}
    assert set(outcome.metrics) >= {"time/figures_s", "time/upload_s", "time/tracking_s", "time/artifacts_s"}


def test_checkpoint_reloads_to_the_same_test_metrics(finished):
    spec, outcome, _ = finished
    checkpoint = load_checkpoint(outcome.checkpoint_dir)
    assert checkpoint.run_spec == spec
    assert checkpoint.name == "unit" and checkpoint.run_id == outcome.run_id
    data = load_data(spec.data, torch.device("cpu"))
    again = quiet_test_metrics(checkpoint.model, data, spec, epochs_run=outcome.epochs_run)
    for key, value in again.items():
        assert value == pytest.approx(outcome.metrics[key], rel=1e-5), key
    assert checkpoint.metrics["test/elbo"] == pytest.approx(outcome.metrics["test/elbo"])


def test_failed_run_is_marked_failed_with_its_reason(mnist_root: Path, tmp_path: Path):
    # A tiny fixed sigma overflows the squared error: the loss is inf at once.
    spec = tiny_run(mnist_root, loss={"likelihood": "gaussian", "sigma": 1e-300})
    logs = MemoryRuns(tmp_path / "runs")
    with pytest.raises(Exception, match="non-finite"):
        run(spec, "unit", logs, show_progress=False)
    log = logs.only()
    assert log.status == "FAILED"
    assert "non-finite" in log.tags[FAILURE_TAG]
    assert not list((tmp_path / "runs" / "resume").rglob("state.pt"))  # a failed run is not resumed


def test_bad_data_opens_no_run(tmp_path: Path):
    spec = tiny_run(tmp_path / "no-such-folder")
    logs = MemoryRuns(tmp_path / "runs")
    with pytest.raises(Exception, match="IDX files not found"):
        run(spec, "unit", logs, show_progress=False)
    assert logs.runs == {}


def test_a_stopped_run_resumes_into_the_same_log(mnist_root: Path, tmp_path: Path):
    """Ctrl-C after epoch 2 ends the run KILLED with its state saved; the same call carries on into the same
    run, logs no epoch twice, and ends with the numbers of a run that was never stopped."""
    from vaelab.training import request_stop

    spec = tiny_run(mnist_root, train={"epochs": 4, "patience": None}, eval={"figures": False})
    logs = MemoryRuns(tmp_path / "runs")

    def ctrl_c_at_epoch_2(epoch: int, _metrics: dict) -> None:
        if epoch == 2:
            request_stop()

    with pytest.raises(KeyboardInterrupt):
        run(spec, "unit", logs, show_progress=False, epoch_callbacks=[ctrl_c_at_epoch_2])
    stopped = logs.only()
    assert stopped.status == "KILLED" and "stopped after epoch 2" in stopped.tags[FAILURE_TAG]
    resumed = run(spec, "unit", logs, show_progress=False)
    assert resumed.run_id == stopped.run_id and stopped.status == "FINISHED"
    assert stopped.tags["vaelab.resumed_from_epoch"] == "2"
    assert [step for step, _ in stopped.history("val/loss")] == [1, 2, 3, 4]
    reference = run(spec, "reference", MemoryRuns(tmp_path / "ref"), show_progress=False)
    assert [h["val/loss"] for h in resumed.history] == [h["val/loss"] for h in reference.history]
    assert resumed.metrics["test/elbo"] == reference.metrics["test/elbo"]
