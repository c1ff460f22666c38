"""search.evaluate: a finished sweep's top runs are evaluated again exactly once,
with two workers, and after a kill mid-way. Real sweeps, MLflow stores and journals."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.conftest import run_vaelab
from tests.test_sweep import GRID, child_runs, make_sweep, write_spec
from vaelab.sweeps.final import final_evaluation

FINAL = {**GRID, "evaluate": {"top": 2, "by": "val/elbo", "set": {"eval.iw_samples": 6}}}
MARKED = "test/nll_iw_k6"


def _evaluations(tmp_path: Path, experiment: str) -> dict[str, int]:
    """Per child run: how many times the final evaluation's metric was logged."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    children, _ = child_runs(tmp_path, experiment)
    return {r.info.run_id: len(client.get_metric_history(r.info.run_id, MARKED)) for r in children}


def _top(tmp_path: Path, experiment: str, n: int) -> set[str]:
    children, _ = child_runs(tmp_path, experiment)
    ranked = sorted(children, key=lambda r: r.data.metrics["best/val/elbo"])
    return {r.info.run_id for r in ranked[:n]}




def test_search_evaluate_takes_the_top_runs_once_with_two_workers(tmp_path: Path, mnist_root: Path):
    spec = write_spec(tmp_path, mnist_root, FINAL)
    done = run_vaelab(tmp_path, "sweep", str(spec), "--workers", "2", "--no-progress")
    assert done.returncode == 0, done.stderr
    counts = _evaluations(tmp_path, "sweep_demo")
    assert len(counts) == 4
    assert {run for run, n in counts.items() if n} == _top(tmp_path, "sweep_demo", 2)
    assert sorted(counts.values()) == [0, 0, 1, 1]  # two workers, each top run evaluated once
    # A finished sweep writes its report, as `make report` would, and puts it on its parent run.
    assert "report: " in done.stdout and (tmp_path / "studies" / "sweep_demo" / "report.md").is_file()
    again = run_vaelab(tmp_path, "sweep", str(spec), "--no-progress")
    assert again.returncode == 0 and "already complete" in again.stdout, again.stderr
    assert _evaluations(tmp_path, "sweep_demo") == counts


def _evaluate_then_die(tmp_path: str, spec: str) -> None:
    sweep = make_sweep(Path(tmp_path), Path(spec))
    parent = sweep.prepare()

    def die(_done) -> None:
        os._exit(9)  # killed right after the first run's evaluation was recorded

    final_evaluation(sweep, parent, on_run=die)


def test_a_final_evaluation_killed_mid_way_finishes_without_repeating(tmp_path: Path, mnist_root: Path):
    spec = write_spec(tmp_path, mnist_root, FINAL)
    sweep = make_sweep(tmp_path, spec)
    parent = sweep.prepare()
    sweep.work(parent)
    child = multiprocessing.get_context("spawn").Process(target=_evaluate_then_die, args=(str(tmp_path), str(spec)))
    child.start()
    child.join(timeout=300)
    assert child.exitcode == 9
    assert sorted(_evaluations(tmp_path, "sweep_demo").values()) == [0, 0, 0, 1]
    resumed = make_sweep(tmp_path, spec)
    assert len(final_evaluation(resumed, resumed.prepare())) == 1  # only the one left
    counts = _evaluations(tmp_path, "sweep_demo")
    assert {run for run, n in counts.items() if n} == _top(tmp_path, "sweep_demo", 2)
    assert sorted(counts.values()) == [0, 0, 1, 1]
    assert final_evaluation(resumed, resumed.prepare()) == []  # done: nothing more
