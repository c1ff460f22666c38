"""A stacked member lives the life of a single run: nan_policy, Ctrl-C after the
epoch, resume after a kill, and the same timing metrics. Real data; an in-memory run log, and a
real MLflow store where a killed process's run is carried on."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import make_idx_folder, tiny_run
from vaelab.data import load_data
from vaelab.errors import RunStopped
from vaelab.runlog import MemoryRunLog, MemoryRuns
from vaelab.runner import run_group, run_stack
from vaelab.spec import RunSpec, with_values
from vaelab.tracking import Tracker
from vaelab.training import fit, fit_stack, init_model, request_stop

CPU = torch.device("cpu")
EPOCHS = 6


def _pair(base: RunSpec) -> list[RunSpec]:
    return [with_values(base, {"loss.beta": 1.0, "train.seed": 1}),
            with_values(base, {"loss.beta": 4.0, "train.seed": 2})]


def _base(root: Path, **train) -> RunSpec:
    return tiny_run(root, train={"epochs": EPOCHS, "batch_size": 32, "device": "cpu", "patience": None, **train},
                    eval={"batch_size": 500, "tsne_points": 0, "iw_samples": 5, "figures": False, "probe": False})


def test_a_stacked_member_rolls_back_on_nan_like_its_single_run(mnist_root: Path):
    base = with_values(_base(mnist_root, epochs=3, batch_size=64), {"train.nan_policy": "retry"})
    runs = [with_values(base, {"train.lr": 1e-3, "train.seed": 1}),
            with_values(base, {"train.lr": 1000.0, "train.seed": 2})]  # Adam steps of 1000 overflow
    data = load_data(base.data, CPU)
    models = [init_model(r, data.shape, CPU) for r in runs]
    stable, diverging = fit_stack(runs, models, data, show_progress=False)
    single = fit(runs[1], init_model(runs[1], data.shape, CPU), data, show_progress=False)
    assert stable.error is None and stable.result.notes == []
    assert diverging.error is None, diverging.error
    assert diverging.result.notes == single.notes and "rolled back to epoch" in single.notes[0]
    assert "1000 -> 100" in diverging.result.notes[0]
    assert len(diverging.result.history) == 3
    assert all(torch.isfinite(p).all() for p in models[1].parameters())
    # Without retry the same member fails alone, with the reason.
    failing = [with_values(r, {"train.nan_policy": "fail"}) for r in runs]
    models = [init_model(r, data.shape, CPU) for r in failing]
    ok, failed = fit_stack(failing, models, data, show_progress=False)
    assert ok.error is None and "train.nan_policy: retry" in str(failed.error)


def _records(store: str, experiment: str):
    client = MlflowClient(store)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    return client, {r.data.params["loss.beta"]: r for r in runs}


def _assert_matches(client, record, expected) -> None:
    """A resumed member's MLflow run against the same member trained without a break."""
    assert record.info.status == "FINISHED", record.data.tags.get("failure_reason")
    history = {}
    for m in client.get_metric_history(record.info.run_id, "val/loss"):
        assert m.step not in history, f"epoch {m.step} logged twice"
        history[m.step] = m.value
    assert sorted(history) == list(range(1, EPOCHS + 1))
    for epoch, metrics in enumerate(expected.history, start=1):
        assert history[epoch] == pytest.approx(metrics["val/loss"], rel=1e-4), epoch
    for key in ("test/elbo", "test/recon", "test/kl"):
        assert record.data.metrics[key] == pytest.approx(expected.metrics[key], rel=1e-4), key


def _assert_logged_as(record: MemoryRunLog, expected) -> None:
    """A resumed member's run log against the same member trained without a break."""
    assert record.status == "FINISHED", record.tags.get("failure_reason")
    steps = [step for step, _ in record.history("val/loss")]
    assert steps == list(range(1, EPOCHS + 1)), "an epoch logged twice, or missing"
    for (_, value), metrics in zip(record.history("val/loss"), expected.history, strict=True):
        assert value == pytest.approx(metrics["val/loss"], rel=1e-4)
    for key in ("test/elbo", "test/recon", "test/kl"):
        assert record.latest()[key] == pytest.approx(expected.metrics[key], rel=1e-4), key


def test_ctrl_c_stops_a_stack_after_the_epoch_and_the_stack_resumes(tmp_path: Path, mnist_root: Path):
    runs = _pair(_base(mnist_root))
    reference = run_stack(runs, "stack_demo", MemoryRuns(tmp_path / "ref"), show_progress=False)
    logs = MemoryRuns(tmp_path / "runs")

    def ctrl_c_at_epoch_2(epoch: int, _metrics: dict) -> None:
        if epoch == 2:
            assert request_stop()  # what the first Ctrl-C does

    stopped = run_group(runs, "stack_demo", logs, show_progress=False, epoch_callbacks=[[ctrl_c_at_epoch_2], []])
    assert all(isinstance(o, RunStopped) for o in stopped)
    records = {r.params["loss.beta"]: r for r in logs.runs.values()}
    for record in records.values():
        assert record.status == "KILLED"
        assert "stopped after epoch 2" in record.tags["failure_reason"]
        assert max(step for step, _ in record.history("val/loss")) == 2
    states = list((tmp_path / "runs" / "resume" / "stack_demo").glob("*/state.pt"))
    assert sorted(torch.load(s, weights_only=True)["epoch"] for s in states) == [2, 2]

    resumed = run_stack(runs, "stack_demo", logs, show_progress=False)
    assert len(logs.runs) == 2  # the same two runs, continued
    for run, outcome, expected in zip(runs, resumed, reference, strict=True):
        record = records[str(run.loss.beta)]
        assert record.run_id == outcome.run_id
        assert record.tags["vaelab.resumed_from_epoch"] == "2"
        assert "failure_reason" not in record.tags
        _assert_logged_as(record, expected)
        for key in ("time/tracking_s", "time/artifacts_s", "time/eval_s", "time/train_s"):
            assert record.latest()[key] > 0, key  # the timings a single run logs
    assert not list((tmp_path / "runs" / "resume").rglob("state.pt"))  # finished runs leave no state


def _train_stack(root: str, store: str) -> None:
    run_stack(_pair(_base(Path(root))), "stack_demo", Tracker(store), show_progress=False)


def test_a_stack_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path: Path):
    root = make_idx_folder(tmp_path / "mnist", n_train=3000, n_test=200)  # epochs long enough to land in
    store = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    child = multiprocessing.get_context("spawn").Process(target=_train_stack, args=(str(root), store))
    child.start()
    deadline = time.time() + 240
    saved: list[int] = []
    while time.time() < deadline and child.is_alive():
        try:
            saved = [torch.load(s, weights_only=True)["epoch"]
                     for s in (tmp_path / "runs" / "resume" / "stack_demo").glob("*/state.pt")]
        except (OSError, EOFError, RuntimeError, KeyError):
            saved = []  # a file being replaced
        if len(saved) == 2 and min(saved) >= 2:
            break
        time.sleep(0.02)
    assert child.is_alive(), "the stack finished before it could be killed"
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    client, killed = _records(store, "stack_demo")
    assert {r.info.status for r in killed.values()} == {"RUNNING"}  # nobody could say goodbye

    runs = _pair(_base(root))
    resumed = run_stack(runs, "stack_demo", Tracker(store), show_progress=False)
    reference = run_stack(runs, "stack_demo", MemoryRuns(tmp_path / "ref"), show_progress=False)
    client, records = _records(store, "stack_demo")
    for run, outcome, expected in zip(runs, resumed, reference, strict=True):
        record = records[str(run.loss.beta)]
        assert record.info.run_id == killed[str(run.loss.beta)].info.run_id == outcome.run_id
        assert int(record.data.tags["vaelab.resumed_from_epoch"]) >= 2
        _assert_matches(client, record, expected)
