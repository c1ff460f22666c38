"""The trial queue while trials run: heartbeats that survive a flaky storage, and a
trial reaped while it ran, with real tiny training runs on a journal storage; workers whose
clocks disagree, on a real PostgreSQL."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import sqlalchemy.exc
from mlflow.tracking import MlflowClient
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from tests.test_sweep import BASE, write_spec
from vaelab.spec import load_spec
from vaelab.sweeps.coordinator import Sweep
from vaelab.sweeps.queue import DIED, HEARTBEAT, MLFLOW_RUN, RETRY_OF, TrialQueue
from vaelab.tracking import Tracker

ONE_POINT = {"kind": "grid", "params": {"loss.beta": [1.0]}}


def new_sweep(tmp_path: Path, path: Path, heartbeat_s: float, grace_s: float) -> Sweep:
    return Sweep(load_spec(path), None, Tracker(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"),
                 studies_root=tmp_path / "studies", heartbeat_s=heartbeat_s, grace_s=grace_s)


@pytest.fixture
def heartbeats(monkeypatch):
    """Wraps the journal storage's set_trial_user_attr: heartbeats written by the heartbeat
    thread are counted, and the first `fail` of them raise a transient database error."""
    from optuna.storages import JournalStorage

    original = JournalStorage.set_trial_user_attr
    seen = {"fail": 0, "raised": 0, "written": 0, "finished": 0}

    def set_trial_user_attr(self, trial_id, key, value):
        if key != HEARTBEAT or threading.current_thread() is threading.main_thread():
            return original(self, trial_id, key, value)
        if seen["raised"] < seen["fail"]:
            seen["raised"] += 1
            raise sqlalchemy.exc.OperationalError("UPDATE trial_user_attributes", {}, Exception("database is locked"))
        try:
            original(self, trial_id, key, value)
        except UpdateFinishedTrialError:
            seen["finished"] += 1
            raise
        seen["written"] += 1

    monkeypatch.setattr(JournalStorage, "set_trial_user_attr", set_trial_user_attr)
    return seen


def test_heartbeat_survives_transient_storage_errors(tmp_path: Path, mnist_root: Path, heartbeats, caplog):
    path = write_spec(tmp_path, mnist_root, ONE_POINT, train={**BASE["train"], "epochs": 2})
    grace = 1.0
    sweep = new_sweep(tmp_path, path, heartbeat_s=0.1, grace_s=grace)
    parent = sweep.prepare()
    heartbeats["fail"] = 2  # the first two heartbeats hit a locked database
    reaped = []

    def on_epoch(trial, epoch: int, metrics: dict) -> None:
        if epoch == 1:  # the trial is alive, busy for three grace periods: another worker looks
            time.sleep(3 * grace)
            reaped.append(new_sweep(tmp_path, path, heartbeat_s=0.1, grace_s=grace).reap_dead())

    assert sweep.work(parent, on_epoch=on_epoch) == 1
    assert heartbeats["raised"] == 2 and heartbeats["written"] >= 10, heartbeats
    assert reaped == [0]
    [trial] = sweep.trials()
    assert trial.state == TrialState.COMPLETE and DIED not in trial.user_attrs
    warnings = [r.getMessage() for r in caplog.records if "heartbeat not recorded" in r.getMessage()]
    assert len(warnings) == 1 and "OperationalError" in warnings[0], warnings  # said once, not per beat


def test_a_worker_whose_trial_was_reaped_while_it_ran_is_fenced(tmp_path: Path, mnist_root: Path, heartbeats,
                                                                capsys):
    path = write_spec(tmp_path, mnist_root, ONE_POINT, train={**BASE["train"], "epochs": 3})
    sweep = new_sweep(tmp_path, path, heartbeat_s=0.1, grace_s=30)
    parent = sweep.prepare()
    reaped = []

    def on_epoch(trial, epoch: int, metrics: dict) -> None:
        if epoch == 1:  # a worker with no patience at all takes this trial for dead, and re-queues it
            reaped.append(new_sweep(tmp_path, path, heartbeat_s=0.1, grace_s=0).reap_dead())
            time.sleep(0.5)  # the heartbeat thread learns from the storage that the trial is not ours any more

    assert sweep.work(parent, on_epoch=on_epoch, max_trials=1) == 1
    assert reaped == [1]
    first, retry = sweep.trials()
    assert first.state == TrialState.FAIL and "no heartbeat" in first.user_attrs[DIED]
    assert retry.state == TrialState.WAITING and retry.user_attrs[RETRY_OF] == first.number
    assert heartbeats["finished"] == 1  # the heartbeat stopped when the storage said the trial was finished
    said = [line for line in capsys.readouterr().err.splitlines() if "was taken from this worker" in line]
    assert len(said) == 1 and f"trial {first.number} " in said[0], said
    # Fenced: after the reap the old worker wrote nothing more to the run (no epoch 2 or 3, no test metrics)
    # and did not end it: it stays KILLED, as the reaper left it.
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = client.get_run(first.user_attrs[MLFLOW_RUN])
    assert run.info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [1]
    assert not [k for k in run.data.metrics if k.startswith("test/")]


def test_a_heartbeat_slower_than_a_third_of_the_grace_period_is_refused():
    import argparse

    from vaelab.errors import UsageError
    from vaelab.sweeps.commands import check_timing

    check_timing(argparse.Namespace(heartbeat_s=10.0, grace_s=60.0))
    for heartbeat, grace in ((30.0, 60.0), (0.0, 60.0), (61.0, 60.0)):
        with pytest.raises(UsageError, match="--heartbeat-s"):
            check_timing(argparse.Namespace(heartbeat_s=heartbeat, grace_s=grace))


def test_workers_with_skewed_clocks_neither_reap_nor_are_reaped(tmp_path: Path, mnist_root: Path, postgres_url: str):
    """One worker's clock an hour behind, another's an hour ahead, a grace period of seconds: heartbeats are
    stamped and judged by the database's clock, so neither takes the other's live trial for dead."""
    path = write_spec(tmp_path, mnist_root, {"kind": "grid", "params": {"loss.beta": [1.0, 2.0]}})
    sweep = Sweep(load_spec(path), postgres_url, Tracker(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"),
                  studies_root=tmp_path / "studies", heartbeat_s=0.2, grace_s=3)
    sweep.prepare()
    behind, ahead = (TrialQueue(sweep.study, sweep.storage, heartbeat_s=0.2, grace_s=3,
                                clock=lambda skew=skew: time.time() + skew) for skew in (-3600, 3600))
    [slow], [fast] = behind.claim(), ahead.claim()
    with behind.beating([slow]), ahead.beating([fast]):
        time.sleep(1.0)  # a few heartbeats each
        assert (behind.reap_dead(), ahead.reap_dead()) == (0, 0)
    trials = sweep.trials()
    assert [t.state for t in trials] == [TrialState.RUNNING] * 2 and not [t for t in trials if DIED in t.user_attrs]
    assert all(abs(t.user_attrs[HEARTBEAT] - time.time()) < 60 for t in trials)  # the server's clock, this host's


class _Died(BaseException):
    """A worker killed between its run's end and its trial's completion (the soak's SIGKILL, in one process)."""


def _die_once(monkeypatch, owner, name: str) -> list:
    """`owner.name` raises _Died on its first call (recorded), then does its work."""
    original, calls = getattr(owner, name), []

    def dying(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise _Died
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, dying)
    return calls


@pytest.mark.parametrize(("stack", "dies_in"), [(1, "complete"), (2, "complete"), (1, "clear_state")],
                         ids=["one run", "a stack of two", "before its resume state was cleared"])
def test_a_point_whose_run_finished_before_its_worker_died_is_not_trained_again(
        tmp_path: Path, mnist_root: Path, monkeypatch, capsys, stack: int, dies_in: str):
    """The window between a run's FINISHED and its trial's completion: the point is re-queued when the worker's
    heartbeat stops, and its retry takes the finished run as its outcome (same objective value, same MLflow run)
    instead of training a second run, and drops the run's resume state if the worker died before clearing it (else
    `vaelab train` would take the run for resumable); in a stack, the member not yet finished trains as before."""
    from vaelab.runner import group

    search = {"kind": "grid", "params": {"loss.beta": [1.0, 2.0][:stack]}, "stack": stack}
    path = write_spec(tmp_path, mnist_root, search)
    sweep = new_sweep(tmp_path, path, heartbeat_s=0.1, grace_s=30)
    parent = sweep.prepare()
    _die_once(monkeypatch, TrialQueue, "complete")
    if dies_in == "clear_state":  # it died before clearing the state too: the first clear does nothing
        skipped: list[Path] = []
        clear = group.clear_state
        monkeypatch.setattr(group, "clear_state",
                            lambda folder: skipped.append(folder) if not skipped else clear(folder))
    with pytest.raises(_Died):
        sweep.work(parent)
    monkeypatch.undo()
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    first = next(t for t in sweep.trials() if t.state == TrialState.RUNNING and MLFLOW_RUN in t.user_attrs
                 and client.get_run(t.user_attrs[MLFLOW_RUN]).info.status == "FINISHED")
    done_run = client.get_run(first.user_attrs[MLFLOW_RUN])
    states = list((tmp_path / "runs" / "resume").rglob("state.pt"))
    if stack == 1:  # (a stack's other member died before it finished: its state is its resume, kept)
        assert bool(states) == (dies_in == "clear_state")

    assert new_sweep(tmp_path, path, heartbeat_s=0.1, grace_s=0).reap_dead() == stack  # its heartbeat stopped
    assert sweep.work(parent) == stack
    trials = sweep.trials()
    retried = [t for t in trials if t.user_attrs.get(RETRY_OF) == first.number]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert retried[0].user_attrs[MLFLOW_RUN] == done_run.info.run_id  # the finished run, not a new one
    assert retried[0].value == done_run.data.metrics["best/val/loss"]
    assert f"its point's run {done_run.info.run_id} had finished before its worker died" in capsys.readouterr().err
    finished = client.search_runs([done_run.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and "
                                                "attributes.status = 'FINISHED'")
    points = sorted(r.data.tags["vaelab.sweep_point"] for r in finished)
    assert len(points) == stack and len(set(points)) == stack  # each point FINISHED once in MLflow
    assert sum(t.state == TrialState.COMPLETE for t in trials) == stack
    assert not list((tmp_path / "runs" / "resume").rglob("state.pt"))


def test_a_finished_run_of_another_trial_with_the_same_point_is_not_taken(tmp_path: Path, mnist_root: Path,
                                                                          monkeypatch):
    """An Optuna search may sample one point twice: a retried trial takes only a run of its own earlier attempts
    (their trial numbers, on the run's optuna.trial_number tag), never another trial's run of the same point."""
    path = write_spec(tmp_path, mnist_root, ONE_POINT)
    sweep = new_sweep(tmp_path, path, heartbeat_s=0.1, grace_s=30)
    parent = sweep.prepare()
    _die_once(monkeypatch, TrialQueue, "complete")
    with pytest.raises(_Died):
        sweep.work(parent)
    monkeypatch.undo()
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    [first] = sweep.trials()
    client.set_tag(first.user_attrs[MLFLOW_RUN], "optuna.trial_number", "999")  # as if another trial's run
    assert new_sweep(tmp_path, path, heartbeat_s=0.1, grace_s=0).reap_dead() == 1
    assert sweep.work(parent) == 1
    [retry] = [t for t in sweep.trials() if t.user_attrs.get(RETRY_OF) == first.number]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs[MLFLOW_RUN] != first.user_attrs[MLFLOW_RUN]
