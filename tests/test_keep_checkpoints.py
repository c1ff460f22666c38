"""train.keep_every / train.keep_best: checkpoints kept while a run trains, each a model of its own at its
epoch (an MLflow LoggedModel; --no-track: kept/epoch-NNNN/), loadable like the final one; the best K only,
the others deleted, files and record; a resumed run keeps what an earlier process kept, once; what it costs
on disk said before training. Real tiny runs on generated data, real MLflow stores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

import vaelab
from tests.conftest import tiny_run
from vaelab import cli
from vaelab.checkpoint import DIGEST_TAG, load_checkpoint
from vaelab.kept import KeepRule, describe
from vaelab.runlog import KEPT_TAG, MemoryRuns
from vaelab.runner import run
from vaelab.spec import RunSpec, with_values
from vaelab.tracking import Tracker, register_best
from vaelab.training.stacked import stack_blocker

QUIET = {"figures": False, "iw_samples": 0, "probe": False}


def kept_models(client: MlflowClient, run_id: str) -> dict[int, object]:
    experiment = client.get_run(run_id).info.experiment_id
    models = client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")
    kept = [m for m in models if KEPT_TAG in m.tags]
    steps = [int(m.tags[KEPT_TAG]) for m in kept]
    assert len(steps) == len(set(steps)), f"an epoch kept twice: {sorted(steps)}"
    return {int(m.tags[KEPT_TAG]): m for m in kept}


def test_the_rule_keeps_every_nth_and_the_k_best_so_far():
    rule = KeepRule(every=2, best=2)
    losses = {1: 9.0, 2: 7.0, 3: 5.0, 4: 6.0, 5: 5.0}
    assert rule.wanted(losses) == {2, 4, 3, 5}  # every 2nd, and the two lowest (3 before 5 on the tie)
    assert KeepRule(best=1).wanted(losses) == {3}
    assert KeepRule(every=3).wanted(losses) == {3}
    assert not KeepRule() and KeepRule(every=1).most(10) == 10 and rule.most(10) == 7


def test_keeping_is_off_by_default_and_moves_no_run_identity():
    assert RunSpec().train.keep_every == 0 and RunSpec().train.keep_best == 0
    assert RunSpec().hash() == "4296fc5ce781dfc8"  # the default run's identity before these keys existed
    kept = with_values(RunSpec(), {"train.keep_every": 5, "train.keep_best": 3})
    assert kept.hash() == RunSpec().hash()  # a resumed run or a sweep point is found whatever it keeps
    assert describe(RunSpec()) is None
    assert stack_blocker(kept) is not None  # its weights live in a stack mid-training: it trains alone


def test_kept_checkpoints_are_logged_models_at_their_epoch_and_the_best_k_only(mnist_root: Path, tracking_uri: str,
                                                                              capsys):
    spec = tiny_run(mnist_root, train={"epochs": 5, "patience": None, "keep_every": 2, "keep_best": 1}, eval=QUIET)
    tracker = Tracker(tracking_uri)
    outcome = run(spec, "keep_demo", tracker, show_progress=True)
    said = capsys.readouterr().err
    assert "keeping a checkpoint every 2 epochs and the best by val/loss: up to 3 besides the final one, ~" in said
    assert " MB each" in said

    client = tracker.client
    kept = kept_models(client, outcome.run_id)
    best = outcome.best_epoch
    assert set(kept) == {2, 4, best}
    record = client.get_run(outcome.run_id)
    outputs = {(o.model_id, o.step) for o in record.outputs.model_outputs}
    for epoch, model in kept.items():
        assert str(model.status).endswith("READY") and model.name == f"epoch-{epoch:04d}"
        assert (model.model_id, epoch) in outputs  # the model's step on the run
        loaded = vaelab.load(f"models:/{model.model_id}", tracking_uri=tracking_uri)
        assert loaded.epoch == epoch and loaded.run_id == outcome.run_id
        assert loaded.checkpoint.metrics["val/loss"] == pytest.approx(outcome.history[epoch - 1]["val/loss"])
    # The best epoch's kept weights are the final checkpoint's.
    best_weights = vaelab.load(f"models:/{kept[best].model_id}", tracking_uri=tracking_uri).checkpoint.digest
    assert best_weights == record.data.tags[DIGEST_TAG]
    # Epochs that dropped out of the best one are gone, files included (MLflow's delete alone keeps them).
    artifacts = Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts"
    weights = {p.parent.parent.name for p in artifacts.rglob("models/*/artifacts/model.pt")}
    assert weights == {m.model_id for m in kept.values()} | {record.data.tags["vaelab.model_id"]}
    # The registry takes the run's final model, never one kept on the way.
    name, version, run_id, _ = register_best(tracker, "keep_demo", "best/val/elbo", True, "keep_demo")
    assert client.get_model_version(name, version).source == f"models:/{record.data.tags['vaelab.model_id']}"


def test_a_resumed_run_keeps_what_was_kept_before_it_was_stopped_once(mnist_root: Path, tracking_uri: str):
    spec = tiny_run(mnist_root, train={"epochs": 5, "patience": None, "keep_every": 1, "checkpoint_every": 2},
                    eval=QUIET)

    def killed_after_epoch_3(epoch: int, metrics: dict) -> None:
        if epoch == 3:  # epoch 3 is kept and logged, but its resume state is not saved (every 2 epochs)
            raise KeyboardInterrupt("gone")

    with pytest.raises(KeyboardInterrupt):
        run(spec, "keep_demo", Tracker(tracking_uri), show_progress=False, epoch_callbacks=[killed_after_epoch_3])
    client = MlflowClient(tracking_uri)
    [stopped] = client.search_runs([client.get_experiment_by_name("keep_demo").experiment_id])
    assert set(kept_models(client, stopped.info.run_id)) == {1, 2, 3}
    before = {e: m.model_id for e, m in kept_models(client, stopped.info.run_id).items()}

    outcome = run(spec, "keep_demo", Tracker(tracking_uri), show_progress=False)  # resumes after epoch 2
    assert outcome.run_id == stopped.info.run_id
    after = kept_models(client, outcome.run_id)  # no epoch kept twice (kept_models checks)
    assert set(after) == {1, 2, 3, 4, 5}
    assert {e: after[e].model_id for e in (1, 2, 3)} == before  # epoch 3, trained again, was not uploaded again


def test_untracked_runs_keep_folders_that_sample_and_dry_run_says_the_cost(mnist_root: Path, tmp_path: Path,
                                                                          monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    spec = {"name": "keep_demo", "base": {
        "data": {"dataset": "mnist", "root": str(mnist_root), "download": False},
        "model": {"z_dim": 4, "hidden": [32]},
        "train": {"epochs": 3, "batch_size": 64, "patience": None, "device": "cpu", "keep_best": 2},
        "eval": QUIET}}
    (tmp_path / "keep_demo.yaml").write_text(yaml.safe_dump(spec))
    assert cli.main(["train", "keep_demo.yaml", "--dry-run"]) == 0
    planned = capsys.readouterr().out
    assert "# keeping a checkpoint the best 2 by val/loss: up to 2 besides the final one" in planned

    assert cli.main(["train", "keep_demo.yaml", "--no-track", "--no-progress"]) == 0
    capsys.readouterr()
    [run_folder] = [p for p in (tmp_path / "untracked" / "keep_demo").iterdir() if p.name != "resume"]
    kept = sorted(p.name for p in (run_folder / "kept").iterdir())
    assert len(kept) == 2 and all(name.startswith("epoch-000") for name in kept)
    folder = run_folder / "kept" / kept[0]
    assert json.loads((folder / "run.json").read_text())["epoch"] == int(kept[0][-4:])
    assert load_checkpoint(folder).epoch == int(kept[0][-4:])
    assert cli.main(["sample", str(folder), "--n", "4", "--out", str(tmp_path / "kept.png")]) == 0
    assert (tmp_path / "kept.png").is_file()


def test_memory_and_mlflow_logs_keep_and_drop_alike(tmp_path: Path, tracking_uri: str):
    files = tmp_path / "files" / "epoch-0003"
    files.mkdir(parents=True)
    (files / "model.pt").write_bytes(b"weights")
    for logs in (MemoryRuns(tmp_path / "memory"), Tracker(tracking_uri)):
        log = logs.open_run("demo", "a-run")
        model_id = log.keep_model(files, 3, {"epoch": 3}, {"vaelab.val_loss": "1.5"})
        other = log.keep_model(files, 5, {"epoch": 5}, {})
        assert model_id and other and log.kept_models() == {3: model_id, 5: other}
        log.drop_model(model_id)
        assert log.kept_models() == {5: other}
        log.end()


def test_a_kept_model_left_pending_by_a_killed_upload_is_marked_failed_on_resume(tracking_uri: str):
    """A process killed between a kept model's record and its upload leaves it PENDING; the run that carries
    on lists it as not kept (its epoch is kept again) and marks it FAILED, so no record stays pending."""
    logs = Tracker(tracking_uri)
    log = logs.open_run("demo", "a-run")
    client = MlflowClient(tracking_uri)
    experiment_id = client.get_run(log.run_id).info.experiment_id
    pending = client.create_logged_model(experiment_id, name="epoch-0002", source_run_id=log.run_id,
                                         tags={KEPT_TAG: "2"})
    assert log.kept_models() == {}
    assert str(client.get_logged_model(pending.model_id).status).endswith("FAILED")
    log.end()
