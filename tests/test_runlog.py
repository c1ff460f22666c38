"""The run-log interface: the in-memory log records what the MLflow one does (the same writes read back
the same from each), so tests that run through memory see what a tracked run would have recorded; and
a resumed run carries on its log without logging an epoch twice, in either."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from vaelab.errors import LeaseLost, RunPruned
from vaelab.runlog import FAILURE_TAG, MemoryRunLog, MemoryRuns, RunLogs, ended_as
from vaelab.tracking import Tracker


@dataclass
class Seen:
    """A run as read back from where it was logged."""

    status: str
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]
    loss_steps: list[int]
    files: set[str]
    models: list[str]


def read(logs: RunLogs, run_id: str) -> Seen:
    if isinstance(logs, MemoryRuns):
        log = logs.runs[run_id]
        files = {str(p.relative_to(log.folder)) for p in log.folder.rglob("*") if p.is_file()}
        return Seen(log.status, log.params, log.tags, log.latest(), [s for s, _ in log.history("train/loss")], files,
                    sorted(m.status for m in log.models.values()))
    client = MlflowClient(logs.uri)
    run = client.get_run(run_id)
    folder = Path(run.info.artifact_uri.removeprefix("file://"))
    files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else set()
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
    return Seen(run.info.status, run.data.params, tags, run.data.metrics,
                [m.step for m in client.get_metric_history(run_id, "train/loss")], files,
                sorted(str(m.status).removeprefix("LoggedModelStatus.") for m in models))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Tracker:
    """One MLflow store for the module (each test logs runs of its own): making a store's schema is seconds."""
    return Tracker(f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}")


@pytest.fixture(params=["memory", "mlflow"])
def logs(request, tmp_path: Path) -> RunLogs:
    if request.param == "memory":
        return MemoryRuns(tmp_path / "memory")
    return request.getfixturevalue("store")


def test_a_finished_run_reads_back_the_same_from_memory_and_mlflow(logs: RunLogs, tmp_path: Path):
    log = logs.open_run("demo", "a-run", {"vaelab.run_hash": "abc"})
    log.log_params({"model.z_dim": 4, "loss.sigma": None})
    log.log_epoch(1, {"train/loss": 3.0, "val/loss": 3.5})
    log.log_epoch(2, {"train/loss": 2.0, "val/loss": 2.5})
    model_id = log.try_start_model({"arch": "mlp"})
    assert model_id
    log.log_model_metrics(model_id, {"test/elbo": 5.0}, step=2)
    log.log_metrics({"train/epochs_run": 2}, step=2)
    log.set_tags({"vaelab.stopped_early": False})
    files = tmp_path / "files"
    (files / "checkpoint").mkdir(parents=True)
    (files / "checkpoint" / "model.pt").write_bytes(b"weights")
    (files / "samples.png").write_bytes(b"png")
    log.log_artifacts(files)
    log.finish_model(model_id, files / "checkpoint", step=2)
    log.end()
    seen = read(logs, log.run_id)
    assert seen.status == "FINISHED"
    assert seen.params == {"model.z_dim": "4", "loss.sigma": "null"}
    assert seen.tags["vaelab.run_hash"] == "abc" and seen.tags["vaelab.stopped_early"] == "False"
    assert seen.metrics == {"train/loss": 2.0, "val/loss": 2.5, "test/elbo": 5.0, "train/epochs_run": 2.0}
    assert seen.loss_steps == [1, 2]
    assert seen.files == {"checkpoint/model.pt", "samples.png"}
    assert seen.models == ["READY"]


def test_a_stopped_run_resumes_without_logging_an_epoch_twice(logs: RunLogs):
    log = logs.open_run("demo", "a-run")
    for epoch in (1, 2, 3):
        log.log_epoch(epoch, {"train/loss": 10.0 - epoch})
    log.end(KeyboardInterrupt("stopped after epoch 3"))
    stopped = read(logs, log.run_id)
    assert stopped.status == "KILLED" and stopped.tags[FAILURE_TAG] == "stopped after epoch 3"

    again = logs.reopen_run(log.run_id)  # its state was saved after epoch 2: epoch 3 trains again
    assert again is not None and again.run_id == log.run_id
    for epoch in (3, 4):
        again.log_epoch(epoch, {"train/loss": 10.0 - epoch})
    assert read(logs, log.run_id).status == "RUNNING" and FAILURE_TAG not in read(logs, log.run_id).tags
    again.end()
    seen = read(logs, log.run_id)
    assert seen.status == "FINISHED" and seen.loss_steps == [1, 2, 3, 4]
    assert logs.reopen_run(log.run_id) is None  # a finished run is not continued


def test_how_a_run_ends_follows_its_error(logs: RunLogs):
    failed = logs.open_run("demo", "failed")
    model_id = failed.try_start_model({"arch": "mlp"})
    assert model_id
    failed.finish_model(model_id, None, step=1)  # the run failed before its weights were uploaded
    failed.end(ValueError("non-finite train/loss"))
    pruned = logs.open_run("demo", "pruned")
    pruned.end(RunPruned("pruned at epoch 2"))
    fenced = logs.open_run("demo", "fenced")
    fenced.end(LeaseLost("the trial is another worker's"))  # it marks the run: this worker leaves it
    assert read(logs, failed.run_id).status == "FAILED" and read(logs, failed.run_id).models == ["FAILED"]
    assert read(logs, failed.run_id).tags[FAILURE_TAG] == "ValueError: non-finite train/loss"
    assert read(logs, pruned.run_id).status == "KILLED"
    assert read(logs, fenced.run_id).status == "RUNNING"
    assert ended_as(None) == ("FINISHED", "")


def test_every_write_is_guarded(tmp_path: Path):
    log = MemoryRuns(tmp_path).open_run("demo", "a-run")

    def fenced() -> None:
        raise LeaseLost("lease lost")

    log.guard = fenced
    for write in (lambda: log.log_params({"a": 1}), lambda: log.set_tags({"a": 1}),
                  lambda: log.log_metrics({"a": 1.0}), lambda: log.log_datasets([]), lambda: log.end()):
        with pytest.raises(LeaseLost):
            write()
    assert log.params == {} and log.status == "RUNNING"


def test_memory_resumes_a_run_of_an_earlier_process(tmp_path: Path):
    """A saved training state names a run id this process never logged: it carries on under that id."""
    log = MemoryRuns(tmp_path).reopen_run("0123abcd" * 4)
    assert isinstance(log, MemoryRunLog) and log.run_id == "0123abcd" * 4 and log.status == "RUNNING"
    assert MemoryRuns(tmp_path).reopen_run("../escape") is None


def test_the_data_becomes_mlflow_dataset_inputs(store: Tracker, tmp_path: Path):
    """A local split names its folder as a file URI, a hub split its path and revision; each input carries
    its context (train / validation / test) and profile."""
    log = store.open_run("demo", "data")
    log.log_datasets([
        {"name": "landscapes/test", "digest": "d1", "source": str(tmp_path / "Testing Data"), "context": "test",
         "profile": {"images": 15, "classes": ["coast", "desert"]}},
        {"name": "sea/train", "digest": "d2", "source": "hf://someone/sea@v2", "context": "train",
         "profile": {"images": 40}}])
    inputs = MlflowClient(store.uri).get_run(log.run_id).inputs.dataset_inputs
    by_context = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs}
    local, hub = by_context["test"], by_context["train"]
    assert local.source_type == "local" and json.loads(local.source)["uri"].endswith("Testing%20Data")
    assert json.loads(local.profile) == {"images": 15, "classes": ["coast", "desert"]} and local.digest == "d1"
    assert hub.source_type == "hugging_face" and json.loads(hub.source) == {"path": "someone/sea", "revision": "v2"}
