"""Interrupts and replaced specs in sweeps, on real Optuna storages, real MLflow stores and
real tiny runs: a second Ctrl-C after some members of a stacked group were settled gives
back only the others; a spec replaced with --allow-spec-change gets a new parent run (the
study's next generation), and the report covers only that spec's runs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from tests.test_sweep import assert_each_point_once, child_runs, make_sweep, write_spec
from vaelab.report import write_study_report
from vaelab.spec import load_spec
from vaelab.sweeps.coordinator import Sweep
from vaelab.sweeps.queue import DIED, MLFLOW_RUN, POINT, RETRY_OF
from vaelab.sweeps.trials import INTERRUPTED
from vaelab.tracking import Tracker

STACKED = {"kind": "grid", "params": {"loss.beta": [0.5, 1.0, 2.0]}, "seeds": [0], "stack": 3}
SMALL = {"kind": "grid", "params": {"loss.beta": [0.5, 2.0]}, "seeds": [0]}


def test_second_ctrl_c_after_a_member_was_told_gives_back_only_the_others(tmp_path: Path, mnist_root: Path):
    path = write_spec(tmp_path, mnist_root, STACKED)
    sweep = make_sweep(tmp_path, path)
    parent = sweep.prepare()
    told: list[FrozenTrial] = []

    def second_ctrl_c(trial: FrozenTrial) -> None:
        told.append(trial)
        raise KeyboardInterrupt  # a second Ctrl-C, landing right after the first member was told

    with pytest.raises(KeyboardInterrupt):
        sweep.work(parent, on_trial=second_ctrl_c)
    assert len(told) == 1 and told[0].state == TrialState.COMPLETE
    settled = told[0]
    trials = sweep.trials()
    by_point: dict[str, list[FrozenTrial]] = {}
    for trial in trials:
        by_point.setdefault(trial.user_attrs[POINT], []).append(trial)
    assert [t.number for t in by_point[settled.user_attrs[POINT]]] == [settled.number]  # told once, kept
    assert sweep.queue.storage.get_trial(settled._trial_id).value == settled.value
    given_back = [p for p in by_point if p != settled.user_attrs[POINT]]
    assert len(given_back) == 2
    for point in given_back:  # the old trial replaced, the point waiting again
        old, new = sorted(by_point[point], key=lambda t: t.number)
        assert old.state == TrialState.FAIL and old.user_attrs[DIED] == INTERRUPTED
        assert new.state == TrialState.WAITING and new.user_attrs[RETRY_OF] == old.number
    runs = {r.info.run_id: r for r in child_runs(tmp_path, sweep.spec.name)[0]}
    assert runs[settled.user_attrs[MLFLOW_RUN]].info.status == "FINISHED"
    assert sorted(r.info.status for r in runs.values()) == ["FINISHED", "KILLED", "KILLED"]

    resumed = make_sweep(tmp_path, path)
    assert resumed.prepare() == parent
    assert resumed.work(parent) == 2  # only the points given back run again
    assert_each_point_once(resumed, tmp_path)
    again = resumed.queue.storage.get_trial(settled._trial_id)
    assert again.state == TrialState.COMPLETE and again.value == settled.value
    children = child_runs(tmp_path, sweep.spec.name)[0]
    assert len(children) == 3  # the two stopped runs went on in their own MLflow runs
    assert Counter(r.data.tags.get("vaelab.resumed_from_epoch") for r in children) == Counter({None: 1, "2": 2})


def _snapshot(client: MlflowClient, run_id: str) -> tuple:
    """Everything a run holds that a later sweep or report could change."""
    run = client.get_run(run_id)
    artifacts = sorted(a.path for a in client.list_artifacts(run_id, "report"))
    return (run.info.status, run.info.end_time, run.data.tags, run.data.params, run.data.metrics, artifacts)


def _parents(tmp_path: Path) -> list:
    return sorted(child_runs(tmp_path, "sweep_demo")[1], key=lambda r: r.info.start_time)


def _sweep_then_replace(tmp_path: Path, mnist_root: Path, sweep_cli, *change: str, grid: dict | None = None):
    """Sweep SMALL, then sweep the spec changed by `change` (or rewritten with `grid`) with
    --allow-spec-change; returns (client, the first parent's snapshot, the first parent run)."""
    path = write_spec(tmp_path, mnist_root, SMALL)
    code, out, err = sweep_cli("sweep", str(path), "--no-progress")
    assert code == 0, err
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (first,) = _parents(tmp_path)
    before = _snapshot(client, first.info.run_id)
    if grid is not None:
        write_spec(tmp_path, mnist_root, grid)
    code, out, err = sweep_cli("sweep", str(path), "--no-progress", *change, "--allow-spec-change")
    assert code == 0, err
    assert "spec is replaced" in out and "new parent run" in out
    return client, before, first


def _report(tmp_path: Path, sweep_cli) -> tuple[pd.DataFrame, str]:
    out_dir = tmp_path / "report"
    spec = tmp_path / "experiments" / "sweep_demo.yaml"
    code, out, err = sweep_cli("report", str(spec), "--out", str(out_dir))
    assert code == 0, err
    return pd.read_csv(out_dir / "table.csv"), (out_dir / "report.md").read_text()


def test_a_replaced_spec_gets_a_new_parent_and_the_report_only_its_runs(tmp_path: Path, mnist_root: Path,
                                                                        sweep_cli):
    client, before, first = _sweep_then_replace(tmp_path, mnist_root, sweep_cli, "--set", "train.epochs=1")
    old_parent, new_parent = _parents(tmp_path)
    assert old_parent.info.run_id == first.info.run_id
    assert new_parent.data.tags["vaelab.sweep.generation"] == "2"
    assert new_parent.data.tags["vaelab.spec_hash"] != old_parent.data.tags.get("vaelab.spec_hash")
    children, _ = child_runs(tmp_path, "sweep_demo")
    under = Counter((r.data.tags["mlflow.parentRunId"], r.data.params["train.epochs"]) for r in children)
    assert under == Counter({(old_parent.info.run_id, "2"): 2, (new_parent.info.run_id, "1"): 2})

    table, report = _report(tmp_path, sweep_cli)
    assert sorted(table["loss.beta"]) == [0.5, 2.0] and list(table["n"]) == [1, 1]
    assert list(table["train/epochs_run mean"]) == [1.0, 1.0]  # the new spec's runs, none of the old
    new_ids = {r.info.run_id for r in children if r.data.params["train.epochs"] == "1"}
    assert all(run_id[:8] in report for run_id in new_ids)
    assert not any(r.info.run_id[:8] in report for r in children if r.info.run_id not in new_ids)
    notes = [line for line in report.splitlines() if "earlier specs" in line]
    assert len(notes) == 1 and "2 runs of earlier specs" in notes[0], notes
    assert _snapshot(client, old_parent.info.run_id) == before  # the old parent run is untouched
    assert client.get_run(new_parent.info.run_id).data.tags["vaelab.best_run"] in new_ids


def test_runs_a_replaced_spec_shares_are_not_run_again_and_stay_in_the_report(tmp_path: Path, mnist_root: Path,
                                                                             sweep_cli):
    # Only how the grid is trained changes (two points per stack): every point is the same run as before.
    client, before, first = _sweep_then_replace(tmp_path, mnist_root, sweep_cli, grid={**SMALL, "stack": 2})
    old_parent, new_parent = _parents(tmp_path)
    children, _ = child_runs(tmp_path, "sweep_demo")
    assert len(children) == 2 and {r.data.tags["mlflow.parentRunId"] for r in children} == {old_parent.info.run_id}
    assert set(new_parent.data.tags["vaelab.sweep.carried.0"].split(",")) == {r.info.run_id for r in children}

    table, report = _report(tmp_path, sweep_cli)
    assert sorted(table["loss.beta"]) == [0.5, 2.0] and list(table["train/epochs_run mean"]) == [2.0, 2.0]
    assert "earlier specs" not in report and "Partial study" not in report
    assert _snapshot(client, old_parent.info.run_id) == before

    # A grid whose values change cannot go on in this study (Optuna fixes each key's choices): one line.
    path = write_spec(tmp_path, mnist_root, {**SMALL, "stack": 2, "params": {"loss.beta": [0.5, 2.0, 4.0]}})
    code, out, err = sweep_cli("sweep", str(path), "--no-progress", "--allow-spec-change")
    assert code == 2 and err.count("\n") == 1 and err.startswith("vaelab: error: "), err
    assert "search.params.loss.beta [0.5, 2.0] -> [0.5, 2.0, 4.0]" in err and "name:" in err, err
    assert len(_parents(tmp_path)) == 2 and len(child_runs(tmp_path, "sweep_demo")[0]) == 2  # nothing made


def test_an_optuna_search_given_more_trials_reports_the_earlier_ones_too(tmp_path: Path, mnist_root: Path):
    search = {"kind": "optuna", "n_trials": 2, "pruner": "none",
              "params": {"loss.beta": {"low": 0.5, "high": 2.0, "log": True}}}
    tracker = Tracker(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")

    def sweep_all(n_trials: int) -> str:
        path = write_spec(tmp_path, mnist_root, {**search, "n_trials": n_trials})
        sweep = Sweep(load_spec(path), None, tracker, studies_root=tmp_path / "studies", allow_spec_change=True)
        parent = sweep.prepare()
        sweep.work(parent)
        sweep.finish(parent)
        return parent

    first, second = sweep_all(2), sweep_all(3)
    assert first != second
    children, _ = child_runs(tmp_path, "sweep_demo")
    assert Counter(r.data.tags["mlflow.parentRunId"] for r in children) == Counter({first: 2, second: 1})
    spec = load_spec(tmp_path / "experiments" / "sweep_demo.yaml")
    report = write_study_report(spec, tracker, tmp_path / "report").read_text()
    # The study taken up again proposes new points, not its first ones again (each run is its own row).
    assert len({r.data.params["loss.beta"] for r in children}) == 3
    assert all(r.info.run_id[:8] in report for r in children)
    assert "earlier specs" not in report and "Partial study" not in report
