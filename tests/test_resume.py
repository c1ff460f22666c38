"""Crash-safe runs: a run killed with SIGKILL, or stopped with Ctrl-C, resumes from
its last epoch into the same MLflow run and ends with the numbers of an
uninterrupted run; non-finite epochs roll back once under train.nan_policy: retry.
Real processes, real signals, real MLflow stores (the uninterrupted reference runs in memory)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, make_idx_folder, tiny_run
from vaelab.data import load_data
from vaelab.resume import ResumeError, holding, load_state, save_state
from vaelab.runlog import MemoryRuns
from vaelab.runner import run as run_once
from vaelab.spec import load_spec, with_values
from vaelab.tracking import Tracker
from vaelab.training import NonFiniteLossError, fit, init_model

EPOCHS = 24


@pytest.fixture(scope="module")
def bigger_mnist(tmp_path_factory) -> Path:
    # Enough images that an epoch takes a moment, so signals land during training.
    return make_idx_folder(tmp_path_factory.mktemp("idx") / "mnist", n_train=3000, n_test=300)


def write_spec(folder: Path, root: Path) -> Path:
    spec = {"name": "resume_demo", "base": {
        "data": {"dataset": "mnist", "root": str(root), "download": False},
        "model": {"z_dim": 4, "hidden": [64]},
        "train": {"epochs": EPOCHS, "batch_size": 32, "patience": None, "device": "cpu", "seed": 3},
        "eval": {"figures": False, "iw_samples": 5, "probe": False},
    }}
    path = folder / "resume_demo.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def start(cwd: Path, spec: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.Popen([sys.executable, "-m", "vaelab", "train", str(spec), "--no-progress"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_saved_epoch(state_file: Path, at_least: int, proc: subprocess.Popen) -> int:
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be interrupted: " + proc.communicate()[1][-2000:])
        try:
            epoch = torch.load(state_file, weights_only=True)["epoch"]
            if epoch >= at_least:
                return epoch
        except (OSError, EOFError, RuntimeError, KeyError):
            pass  # not written yet
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no resume state was saved")


def state_file(cwd: Path) -> Path:
    [found] = list((cwd / "runs" / "resume" / "resume_demo").glob("*/state.pt")) or [None]
    return found


def reference(spec: Path, tmp_path: Path):
    """The same run, uninterrupted, logged in memory."""
    return run_once(load_spec(spec).base, "resume_demo", MemoryRuns(tmp_path / "reference"), show_progress=False)


def only_run(cwd: Path):
    client = MlflowClient(f"sqlite:///{cwd / 'runs' / 'mlflow.db'}")
    [record] = client.search_runs([client.get_experiment_by_name("resume_demo").experiment_id])
    return client, record


def assert_same_as(client, record, expected) -> None:
    assert record.info.status == "FINISHED"
    history = {m.step: m.value for m in client.get_metric_history(record.info.run_id, "val/loss")}
    assert sorted(history) == list(range(1, EPOCHS + 1))
    for epoch, metrics in enumerate(expected.history, start=1):
        assert history[epoch] == pytest.approx(metrics["val/loss"], rel=1e-6), epoch
    for key in ("test/elbo", "test/recon", "test/kl", "test/nll_iw"):
        assert record.data.metrics[key] == pytest.approx(expected.metrics[key], rel=1e-6), key


def _find_state(cwd: Path, proc: subprocess.Popen) -> Path:
    deadline = time.time() + 120
    while time.time() < deadline and state_file(cwd) is None:
        if proc.poll() is not None:
            pytest.fail(proc.communicate()[1][-2000:])
        time.sleep(0.05)
    return state_file(cwd)


def test_sigkill_mid_run_resumes_into_the_same_mlflow_run(tmp_path: Path, bigger_mnist: Path):
    spec = write_spec(tmp_path, bigger_mnist)
    first = start(tmp_path, spec)
    saved = wait_for_saved_epoch(_find_state(tmp_path, first), 3, first)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    _, killed = only_run(tmp_path)
    assert killed.info.status == "RUNNING"  # nobody could say goodbye

    again = start(tmp_path, spec)
    _, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr
    client, record = only_run(tmp_path)  # the same run, not a second one
    assert record.info.run_id == killed.info.run_id
    assert int(record.data.tags["vaelab.resumed_from_epoch"]) >= saved
    assert_same_as(client, record, reference(spec, tmp_path))
    assert not list((tmp_path / "runs" / "resume").rglob("state.pt"))  # a finished run leaves no state


def _die_after_logging(spec_path: str, store: str, epoch: int) -> None:
    """A run whose process vanishes after epoch `epoch` is logged but before its state is saved."""

    def vanish(done: int, metrics: dict) -> None:
        if done == epoch:
            os._exit(9)

    run_spec = with_values(load_spec(Path(spec_path)).base, {"train.epochs": 6})
    run_once(run_spec, "resume_demo", Tracker(store), show_progress=False, epoch_callbacks=[vanish])


def test_epochs_logged_before_a_kill_are_not_logged_twice_on_resume(tmp_path: Path, mnist_root: Path):
    spec = write_spec(tmp_path, mnist_root)
    store = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    child = multiprocessing.get_context("spawn").Process(target=_die_after_logging, args=(str(spec), store, 3))
    child.start()
    child.join(timeout=300)
    assert child.exitcode == 9
    client, killed = only_run(tmp_path)
    assert max(m.step for m in client.get_metric_history(killed.info.run_id, "val/loss")) == 3
    assert torch.load(state_file(tmp_path), weights_only=True)["epoch"] == 2  # epoch 3 runs again

    run_spec = with_values(load_spec(spec).base, {"train.epochs": 6})
    run_once(run_spec, "resume_demo", Tracker(store), show_progress=False)
    client, record = only_run(tmp_path)
    assert record.info.run_id == killed.info.run_id and record.info.status == "FINISHED"
    for key in ("val/loss", "train/loss", "train/kl"):
        steps = [m.step for m in client.get_metric_history(record.info.run_id, key)]
        assert sorted(steps) == [1, 2, 3, 4, 5, 6], key


def test_ctrl_c_finishes_the_epoch_then_the_run_resumes(tmp_path: Path, bigger_mnist: Path):
    spec = write_spec(tmp_path, bigger_mnist)
    first = start(tmp_path, spec)
    wait_for_saved_epoch(_find_state(tmp_path, first), 2, first)
    first.send_signal(signal.SIGINT)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 130, stderr
    assert "finishing this epoch" in stderr and "resumes" in stderr
    client, stopped = only_run(tmp_path)
    assert stopped.info.status == "KILLED"
    assert "stopped after epoch" in stopped.data.tags["failure_reason"]
    logged = client.get_metric_history(stopped.info.run_id, "val/loss")
    # The epoch under way when Ctrl-C came was finished, logged and saved.
    assert torch.load(state_file(tmp_path), weights_only=True)["epoch"] == max(m.step for m in logged)

    again = start(tmp_path, spec)
    _, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr
    client, record = only_run(tmp_path)
    assert record.info.run_id == stopped.info.run_id
    assert "failure_reason" not in record.data.tags
    assert_same_as(client, record, reference(spec, tmp_path))


def test_nan_policy_retry_rolls_back_once_at_a_lower_lr(mnist_root: Path):
    run = with_values(tiny_run(mnist_root, train={"epochs": 3, "batch_size": 64, "device": "cpu", "patience": None}),
                      {"train.lr": 1000.0})  # Adam steps of 1000 overflow within two epochs
    data = load_data(run.data, torch.device("cpu"))
    with pytest.raises(NonFiniteLossError, match=r"at epoch (\d+).*train.nan_policy: retry") as failed:
        fit(run, init_model(run, data.shape, torch.device("cpu")), data, show_progress=False)
    bad_epoch = int(str(failed.value).split("at epoch ")[1].split()[0])

    retry = with_values(run, {"train.nan_policy": "retry"})
    model = init_model(retry, data.shape, torch.device("cpu"))
    result = fit(retry, model, data, show_progress=False)
    assert result.notes == [result.notes[0]] and f"at epoch {bad_epoch}: rolled back to epoch {bad_epoch - 1}" \
        in result.notes[0] and "1000 -> 100" in result.notes[0]
    assert len(result.history) == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_state_is_atomic_checked_and_locked(tmp_path: Path, mnist_root: Path):
    run = tiny_run(mnist_root, train={"epochs": 2, "batch_size": 64, "device": "cpu", "patience": None})
    data = load_data(run.data, torch.device("cpu"))
    saved = []
    fit(run, init_model(run, data.shape, torch.device("cpu")), data, show_progress=False, save_state=saved.append)
    assert [s.epoch for s in saved] == [1, 2]
    state, folder = saved[0], tmp_path / "state"
    state.run_hash = run.hash()
    save_state(folder, state)
    assert sorted(p.name for p in folder.iterdir()) == ["state.pt"]  # no temp file left behind
    assert load_state(folder, run.hash()).epoch == 1
    with pytest.raises(ResumeError, match="saved for run"):
        load_state(folder, "another-run")
    blob = (folder / "state.pt").read_bytes()
    (folder / "state.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ResumeError, match="unreadable resume state"):
        load_state(folder, run.hash())
    probe = ("import sys; from pathlib import Path; from vaelab.resume import holding, RunInProgress\n"
             "try:\n    holding(Path(sys.argv[1])).__enter__()\nexcept RunInProgress:\n    sys.exit(3)")
    with holding(folder):  # a second process cannot train the same run at the same time
        done = subprocess.run([sys.executable, "-c", probe, str(folder)], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        assert done.returncode == 3
    done = subprocess.run([sys.executable, "-c", probe, str(folder)], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0  # released when its holder is done
