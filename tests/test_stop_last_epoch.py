"""A stop asked for during any epoch (a first Ctrl-C), the last one included, ends the run KILLED
after that epoch with its resume state saved; the same command then resumes it, and a run with
no epoch left goes straight to its evaluation and ends FINISHED with the numbers of a run never
stopped. The stop comes through the training session's own request (what the CLI's SIGINT
handler calls), from inside the epoch; the run log is the in-memory one (MLflow is not the subject)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_run
from vaelab.errors import RunStopped
from vaelab.runlog import MemoryRuns
from vaelab.runner import run
from vaelab.spec import with_values
from vaelab.training.session import request_stop


def stop_during(epoch: int):
    def callback(done: int, _metrics: dict) -> None:
        if done == epoch:
            assert request_stop()  # the epoch is still under way: its end-of-epoch work is running
    return callback


def saved_epoch(root: Path) -> int:
    [state] = list((root / "resume").rglob("state.pt"))
    return torch.load(state, weights_only=True)["epoch"]


@pytest.mark.parametrize(("epochs", "stop_at", "every"), [(3, 3, 1), (4, 3, 2), (2, 2, 0)],
                         ids=["the last epoch", "an epoch checkpoint_every does not save",
                              "the last epoch with no resume states on the way"])
def test_a_stop_in_any_epoch_ends_killed_then_the_same_run_resumes_to_finished(
        tmp_path: Path, mnist_root: Path, epochs: int, stop_at: int, every: int):
    spec = with_values(tiny_run(mnist_root, train={"epochs": epochs, "batch_size": 64, "device": "cpu",
                                                   "patience": None}),
                       {"train.checkpoint_every": every, "eval.iw_samples": 5, "eval.figures": False})
    reference = run(spec, "stops", MemoryRuns(tmp_path / "reference"), show_progress=False)

    logs = MemoryRuns(tmp_path / "runs")
    with pytest.raises(RunStopped, match=f"stopped after epoch {stop_at} of {epochs} on request"):
        run(spec, "stops", logs, show_progress=False, epoch_callbacks=[stop_during(stop_at)])
    stopped = logs.only()
    assert stopped.status == "KILLED"
    assert not any(k.startswith("test/") for k in stopped.metrics)  # no evaluation ran
    assert saved_epoch(tmp_path / "runs") == stop_at

    outcome = run(spec, "stops", logs, show_progress=False)
    assert outcome.run_id == stopped.run_id and logs.only().status == "FINISHED"
    assert [h["val/loss"] for h in outcome.history] == [h["val/loss"] for h in reference.history]
    for key in ("test/elbo", "test/recon", "test/kl", "test/nll_iw"):
        assert outcome.metrics[key] == pytest.approx(reference.metrics[key], rel=1e-6), key
    assert not list((tmp_path / "runs" / "resume").rglob("state.pt"))  # a finished run leaves no state


def test_a_slurm_term_while_an_epoch_is_recorded_waits_for_its_save(tmp_path: Path, mnist_root: Path):
    """Slurm's TERM stops a worker at once, except while an epoch is being recorded (metrics logged, state not yet
    saved): then the epoch is saved first, the run ends KILLED after it, and resuming logs no epoch twice. A real
    SIGTERM to this process, through the handler a Slurm task installs, from inside the epoch's recording."""
    import os
    import signal

    from vaelab.sweeps.slurm_task import TaskStop
    from vaelab.training.session import recording

    spec = with_values(tiny_run(mnist_root, train={"epochs": 3, "batch_size": 64, "device": "cpu", "patience": None}),
                       {"eval.iw_samples": 5, "eval.figures": False})
    seen = []

    def term_at_epoch_2(done: int, _metrics: dict) -> None:
        if done == 2:
            seen.append(recording())
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here, inside the epoch's recording

    logs = MemoryRuns(tmp_path / "runs")
    before = signal.getsignal(signal.SIGTERM)
    stop = TaskStop.install({"SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3", "VAELAB_SLURM_TASK": "1"})
    try:
        assert stop is not None
        with pytest.raises(RunStopped, match="stopped after epoch 2 of 3"):
            run(spec, "term", logs, show_progress=False, epoch_callbacks=[term_at_epoch_2])
    finally:
        signal.signal(signal.SIGTERM, before)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    assert seen == [True] and not recording()  # recording while the callbacks ran, and not after
    assert "stopped by TERM" in (stop.asked() or "")
    assert logs.only().status == "KILLED" and saved_epoch(tmp_path / "runs") == 2
    outcome = run(spec, "term", logs, show_progress=False)
    assert logs.only().status == "FINISHED" and outcome.epochs_run == 3
