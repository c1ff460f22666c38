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
