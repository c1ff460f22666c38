"""Sweeps against real Optuna storages (journal file, PostgreSQL when one is
reachable) and real MLflow stores, with real tiny training runs."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tests.conftest import REPO
from vaelab.search import expand_grid
from vaelab.spec import load_spec
from vaelab.sweeps.coordinator import Sweep
from vaelab.sweeps.queue import DIED, DUPLICATE, HEARTBEAT, MLFLOW_RUN, POINT, WORKER
from vaelab.tracking import Tracker

BASE = {
    "model": {"z_dim": 3, "hidden": [32]},
    "train": {"epochs": 2, "batch_size": 64, "device": "cpu", "patience": None},
    "eval": {"figures": False, "iw_samples": 0, "probe": False},
}


def write_spec(folder: Path, mnist_root: Path, search: dict, name: str = "sweep_demo", **base) -> Path:
    data = {"dataset": "mnist", "root": str(mnist_root), "download": False}
    body = {"name": name, "base": {**BASE, "data": data, **base}, "search": search}
    (folder / "experiments").mkdir(exist_ok=True)
    path = folder / "experiments" / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


GRID = {"kind": "grid", "params": {"loss.beta": [0.5, 2.0]}, "seeds": [0, 1]}


def make_sweep(tmp_path: Path, spec_path: Path, storage: str | None = None) -> Sweep:
    tracker = Tracker(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    return Sweep(load_spec(spec_path), storage, tracker, studies_root=tmp_path / "studies", heartbeat_s=1,
                 grace_s=30)


def child_runs(tmp_path: Path, experiment: str):
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags], [r for r in runs if "vaelab.sweep" in r.data.tags]


def assert_each_point_once(sweep: Sweep, tmp_path: Path) -> None:
    expected = {p.run.hash() for p in sweep.points}
    complete = [t for t in sweep.trials() if t.state == TrialState.COMPLETE]
    assert Counter(t.user_attrs[POINT] for t in complete) == Counter({h: 1 for h in expected})
    children, parents = child_runs(tmp_path, sweep.spec.name)
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert Counter(r.data.tags["vaelab.run_hash"] for r in finished) == Counter({h: 1 for h in expected})
    assert not [r for r in children if r.info.status == "RUNNING"]
    assert len(parents) == 1
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}


def run_whole_sweep(tmp_path: Path, path: Path, n_points: int) -> tuple[Sweep, str]:
    """Prepare and work a sweep in this process; every point must finish exactly once."""
    sweep = make_sweep(tmp_path, path)
    parent = sweep.prepare()
    assert sweep.work(parent) == n_points
    assert sweep.finish(parent).complete == n_points
    assert_each_point_once(sweep, tmp_path)
    return sweep, parent


def test_grid_sweep_runs_every_point_once_then_says_complete(tmp_path: Path, mnist_root: Path):
    path = write_spec(tmp_path, mnist_root, GRID)
    sweep, parent = run_whole_sweep(tmp_path, path, 4)
    _, [parent_run] = child_runs(tmp_path, "sweep_demo")
    assert parent_run.info.status == "FINISHED"

    again = make_sweep(tmp_path, path)
    assert again.prepare() == parent
    assert again.work(parent) == 0
    children, _ = child_runs(tmp_path, "sweep_demo")
    assert len(children) == 4
    # Child params are the point's values, and its tags say which trial it was.
    by_trial = {int(r.data.tags["optuna.trial_number"]): r for r in children}
    points = expand_grid(sweep.search, sweep.spec.base)
    for trial in sweep.trials():
        assert by_trial[trial.number].data.params["loss.beta"] == str(trial.params["loss.beta"])
    assert {float(r.data.params["loss.beta"]) for r in children} == {p.values["loss.beta"] for p in points}
    # Each configuration's seeds share one vaelab.config tag (MLflow groups runs by it): two groups of two.
    groups = Counter(r.data.tags["vaelab.config"] for r in children)
    assert groups == {"loss.beta=0.5": 2, "loss.beta=2.0": 2}
    for run in children:
        assert run.data.tags["vaelab.config"] == f"loss.beta={float(run.data.params['loss.beta'])}"


def test_a_union_of_grids_sweeps_each_grid_once_with_its_own_keys(tmp_path: Path, mnist_root: Path):
    union = {"kind": "grid", "seeds": [0], "params": [
        {"loss.objective": ["beta_vae"], "loss.beta": [0.5, 2.0]},
        {"loss.objective": ["dip_vae_i"], "loss.dip_lambda_od": [1.0, 5.0]},
    ]}
    sweep, _ = run_whole_sweep(tmp_path, write_spec(tmp_path, mnist_root, union), 4)
    children, _ = child_runs(tmp_path, "sweep_demo")
    seen = sorted((r.data.params["loss.objective"], float(r.data.params["loss.beta"]),
                   r.data.params.get("loss.dip_lambda_od")) for r in children)
    # dip_vae_i runs keep the base beta (1); beta_vae runs do not use dip_lambda_od, so it is not a param there.
    assert seen == [("beta_vae", 0.5, None), ("beta_vae", 2.0, None), ("dip_vae_i", 1.0, "1.0"),
                    ("dip_vae_i", 1.0, "5.0")]
    beta_run = next(r for r in children if r.data.params["loss.objective"] == "beta_vae")
    assert "loss.dip_lambda_od" in beta_run.data.tags["vaelab.params_not_used"].split(", ")
    # Run names lead with what tells the run apart: its own grid's values and the seed, then the trial.
    names = sorted(r.info.run_name.split(" · ")[0] for r in children)
    # (write_spec's YAML sorts keys, so loss.beta comes before loss.objective there)
    assert names == ["beta=0.5 objective=beta_vae seed=0", "beta=2.0 objective=beta_vae seed=0",
                     "objective=dip_vae_i dip_lambda_od=1.0 seed=0", "objective=dip_vae_i dip_lambda_od=5.0 seed=0"]


def test_the_parent_run_and_experiment_say_what_the_sweep_is(tmp_path: Path, mnist_root: Path):
    path = write_spec(tmp_path, mnist_root, GRID)
    body = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**body, "description": "What beta does to a tiny VAE."}))
    sweep = make_sweep(tmp_path, path)
    parent_id = sweep.prepare()
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    parent = client.get_run(parent_id)
    params = parent.data.params
    # The grid overrides base.loss.beta and base.train.seed: they are not logged as if they held.
    assert "base.loss.beta" not in params and "base.train.seed" not in params and "base.model.z_dim" in params
    assert "base.loss.sigma" not in params  # a Bernoulli sweep does not use it
    assert params["search.values"] == "loss.beta=[0.5, 2.0] x seeds [0, 1]"
    assert "What beta does" in parent.data.tags["mlflow.note.content"]
    tags = client.get_experiment(parent.info.experiment_id).tags
    assert tags["mlflow.note.content"] == "What beta does to a tiny VAE."
    assert tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens its model-training view


def test_failing_trial_does_not_stop_the_sweep(tmp_path: Path, mnist_root: Path):
    search = {"kind": "grid", "params": {"loss.sigma": [1e-300, 0.1]}}
    path = write_spec(tmp_path, mnist_root, search, loss={"likelihood": "gaussian"})
    sweep = make_sweep(tmp_path, path)
    parent = sweep.prepare()
    sweep.work(parent)
    states = {t.params["loss.sigma"]: t for t in sweep.trials()}
    assert states[1e-300].state == TrialState.FAIL
    assert "non-finite" in states[1e-300].user_attrs["failure_reason"]
    assert states[0.1].state == TrialState.COMPLETE
    children, _ = child_runs(tmp_path, "sweep_demo")
    assert sorted(r.info.status for r in children) == ["FAILED", "FINISHED"]
    # A failed point is a result, not a hole: the rerun does not repeat it.
    assert make_sweep(tmp_path, path).work(sweep.prepare()) == 0


def test_pruning_marks_trials_pruned_in_optuna_and_mlflow(tmp_path: Path, mnist_root: Path):
    search = {"kind": "optuna", "n_trials": 8, "sampler": "random", "pruner": "median", "seed": 3,
              "params": {"train.lr": {"low": 1e-5, "high": 3e-2, "log": True}}}
    path = write_spec(tmp_path, mnist_root, search, train={**BASE["train"], "epochs": 4})
    sweep = make_sweep(tmp_path, path)
    parent = sweep.prepare()
    sweep.work(parent)
    states = Counter(t.state for t in sweep.trials())
    assert states[TrialState.PRUNED] >= 1 and states[TrialState.COMPLETE] >= 3
    assert sum(states.values()) == 8
    children, _ = child_runs(tmp_path, "sweep_demo")
    pruned = [r for r in children if r.info.status == "KILLED"]
    assert len(pruned) == states[TrialState.PRUNED]
    assert all("pruned" in r.data.tags["failure_reason"] for r in pruned)


def test_dead_worker_trial_is_requeued_and_twins_step_aside(tmp_path: Path, mnist_root: Path):
    path = write_spec(tmp_path, mnist_root, GRID)
    sweep = make_sweep(tmp_path, path)
    parent = sweep.prepare()
    # A trial claimed by a worker on another machine that stopped beating long ago.
    waiting = sweep.study.get_trials(states=(TrialState.WAITING,))[0]
    storage = sweep.storage
    storage.set_trial_state_values(waiting._trial_id, TrialState.RUNNING)
    storage.set_trial_user_attr(waiting._trial_id, WORKER, "elsewhere:1")
    storage.set_trial_user_attr(waiting._trial_id, HEARTBEAT, time.time() - 3600)
    # And the same point enqueued twice, as by two `vaelab sweep` commands racing.
    twin = sweep.points[1]
    sweep.study.enqueue_trial(twin.values, user_attrs={POINT: twin.run.hash()})
    sweep.work(parent)
    trials = sweep.trials()
    dead = [t for t in trials if DIED in t.user_attrs]
    assert [t.number for t in dead] == [waiting.number] and "no heartbeat" in dead[0].user_attrs[DIED]
    assert len([t for t in trials if DUPLICATE in t.user_attrs]) == 1
    assert sweep.counts().complete == 4
    assert_each_point_once(sweep, tmp_path)


def vaelab(cwd: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.Popen([sys.executable, "-m", "vaelab", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_kill_9_then_rerun_finishes_each_point_exactly_once(tmp_path: Path, mnist_root: Path):
    # Longer trials so the kill lands inside one.
    path = write_spec(tmp_path, mnist_root, GRID, train={**BASE["train"], "epochs": 12})
    first = vaelab(tmp_path, "sweep", str(path), "--no-progress")
    journal = tmp_path / "studies" / "sweep_demo" / "optuna.journal"
    deadline = time.time() + 120
    while time.time() < deadline:
        if journal.exists():
            study = optuna.load_study(study_name="sweep_demo", storage=make_sweep(tmp_path, path).storage)
            running = study.get_trials(states=(TrialState.RUNNING,))
            done = study.get_trials(states=(TrialState.COMPLETE,))
            if done and running and MLFLOW_RUN in running[0].user_attrs:
                break
        time.sleep(0.2)
    else:
        first.kill()
        pytest.fail("the sweep never got to a second trial: " + first.communicate()[0])
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()

    rerun = vaelab(tmp_path, "sweep", str(path), "--no-progress")
    output = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, output
    assert "resuming" in output and "re-queued" in output
    sweep = make_sweep(tmp_path, path)
    assert_each_point_once(sweep, tmp_path)
    children, _ = child_runs(tmp_path, "sweep_demo")
    # The killed trial's run either resumed from its last saved epoch (and finished), or, killed
    # before its first epoch ended, stays KILLED beside a fresh run of the point.
    resumed = [r for r in children if "vaelab.resumed_from_epoch" in r.data.tags]
    assert [r.info.status for r in children].count("KILLED") + len(resumed) == 1


def test_two_local_workers_share_one_study(tmp_path: Path, mnist_root: Path):
    path = write_spec(tmp_path, mnist_root, GRID)
    done = vaelab(tmp_path, "sweep", str(path), "--workers", "2", "--no-progress")
    output = done.communicate(timeout=300)[0]
    assert done.returncode == 0, output
    sweep = make_sweep(tmp_path, path)
    assert_each_point_once(sweep, tmp_path)
    # Trials were run by the worker processes, not by the command itself.
    assert done.pid not in {int(t.user_attrs[WORKER].rsplit(":", 1)[1]) for t in sweep.trials()}
    assert "4 complete" in output


def _open_together(barrier, url: str, spec_path: str) -> None:
    from vaelab.sweeps.storage import open_storage

    barrier.wait()  # all processes reach the empty database at once
    open_storage(load_spec(Path(spec_path)), url)


def test_workers_starting_together_on_an_empty_database_all_connect(tmp_path: Path, mnist_root: Path,
                                                                    postgres_url: str):
    path = write_spec(tmp_path, mnist_root, GRID)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(4)
    workers = [context.Process(target=_open_together, args=(barrier, postgres_url, str(path))) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0] * 4


def _prepare_together(barrier, tmp_path: Path, spec_path: Path, url: str, parents) -> None:
    sweep = make_sweep(tmp_path, spec_path, storage=url)
    barrier.wait()  # every worker finds the study with no parent run and no trials yet
    parents.put(sweep.prepare())


def test_workers_preparing_at_once_share_one_parent_run_and_one_trial_per_point(tmp_path: Path, mnist_root: Path,
                                                                                postgres_url: str):
    path = write_spec(tmp_path, mnist_root, GRID)
    make_sweep(tmp_path, path, storage=postgres_url)  # schema, study and MLflow store exist; nothing else does
    context = multiprocessing.get_context("spawn")
    barrier, parents = context.Barrier(3), context.Queue()
    workers = [context.Process(target=_prepare_together, args=(barrier, tmp_path, path, postgres_url, parents))
               for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0] * 3
    assert len({parents.get(timeout=5) for _ in workers}) == 1
    sweep = make_sweep(tmp_path, path, storage=postgres_url)
    assert len(child_runs(tmp_path, sweep.spec.name)[1]) == 1
    assert Counter(t.user_attrs[POINT] for t in sweep.trials()) == Counter({p.run.hash(): 1 for p in sweep.points})


def test_workers_share_a_postgresql_study(tmp_path: Path, mnist_root: Path, postgres_url: str):
    url = postgres_url
    name = f"pg_{uuid.uuid4().hex[:10]}"
    path = write_spec(tmp_path, mnist_root, GRID, name=name)
    # Two separate `vaelab worker` processes, as on two machines, sharing the database and the MLflow store.
    workers = [vaelab(tmp_path, "worker", str(path), "--storage", url) for _ in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    sweep = make_sweep(tmp_path, path, storage=url)
    states = [(t.number, t.state.name, t.user_attrs.get("worker")) for t in sweep.trials()]
    assert [state for _, state, _ in states].count("COMPLETE") == 4, (states, outputs)  # says why, if not
    assert_each_point_once(sweep, tmp_path)
    assert sum(int(o.split(" ran ")[1].split()[0]) for o in outputs) == 4
