"""A member's run log and resume state, before training: the run its resume state names, reopened
(RUNNING again, carrying on), else a new one with the run's params, tags and data; the state
folder held by this process alone; tracking's own seconds counted."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vaelab.data import ImageData
from vaelab.resume import TrainState, load_state, save_state, state_dir
from vaelab.runlog import HASH_TAG, RunLog, RunLogs
from vaelab.spec import RunSpec, flatten, unused_keys

# What each metric means, stored on the run so no one misreads a sign or a unit.
METRIC_NOTES = (
    "Units: nats per image. test/elbo is the NEGATIVE ELBO (recon + kl, beta=1): lower is better. "
    "recon = -log p(x|z); kl = KL(q(z|x) || N(0,I)); loss = recon + beta*kl; mse is per pixel."
)
# The spec keys a run does not use (not logged as params: spec.unused_keys), listed in one tag.
UNUSED_TAG = "vaelab.params_not_used"


def run_tags(run_spec: RunSpec, data: ImageData, device, flight, extra_tags: dict[str, str] | None) -> dict:
    return {
        HASH_TAG: run_spec.hash(),
        "vaelab.data": data.description,
        "vaelab.device": str(device),
        "vaelab.n_params": flight.n_params,
        "vaelab.activation_mb": round(flight.activation_mb, 1),
        "vaelab.preflight": flight.line,
        "mlflow.note.content": METRIC_NOTES,
        **(extra_tags or {}),
    }


def system_metrics_wanted(setting: bool | str, tracking_uri: str) -> bool:
    """train.system_metrics: auto samples the machine when runs go to a tracking server (their overhead is
    under 1 % of a run: bench/RESULTS.md), not into a local SQLite file, where the sampler thread would be
    a second writer on one file beside every local sweep worker's."""
    if setting == "auto":
        return tracking_uri.startswith(("http://", "https://"))
    return bool(setting)


def resume_folder(logs: RunLogs, experiment: str, run_hash: str) -> Path:
    """Where a run keeps its resume state (and the lock that makes it this process's alone)."""
    return state_dir(logs.resume_root, experiment, run_hash)


class TimedLog:
    """A run log's per-epoch logging, timed: the seconds tracking costs are reported as
    time/tracking_s, so the overhead of a run is measured, not guessed."""

    def __init__(self, log: RunLog, seconds: float = 0.0):
        self.log, self.seconds = log, seconds

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        started = time.perf_counter()
        self.log.log_epoch(epoch, metrics)
        self.seconds += time.perf_counter() - started


@dataclass
class Opened:
    """A member's run log and resume state, opened before training."""

    log: RunLog
    timed: TimedLog
    folder: Path
    run_hash: str
    prior: TrainState | None

    def save(self, state: TrainState) -> None:
        state.run_id, state.run_hash = self.log.run_id, self.run_hash
        save_state(self.folder, state)


def open_member(logs: RunLogs, run_spec: RunSpec, experiment: str, name: str, tags: dict,
                on_start: Callable[[str], None] | None, datasets: list[dict],
                guard: Callable[[], None] | None = None) -> Opened:
    """The member's run: the one its resume state names (RUNNING again), else a new one."""
    started = time.perf_counter()
    run_hash = tags[HASH_TAG]
    folder = resume_folder(logs, experiment, run_hash)
    prior = load_state(folder, run_hash)
    log = logs.reopen_run(prior.run_id) if prior is not None else None
    if log is None:  # nothing to resume (or its run is gone): a fresh run
        prior = None
        log = logs.open_run(experiment, name, tags)
    if guard is not None:
        log.guard = guard
    opened = Opened(log, TimedLog(log), folder, run_hash, prior)
    try:
        if on_start is not None:
            on_start(log.run_id)
        if system_metrics_wanted(run_spec.train.system_metrics, logs.uri):
            log.start_system_metrics(run_spec.train.system_metrics_s)
        if prior is None:
            unused = unused_keys(run_spec)
            log.log_params({k: v for k, v in flatten(run_spec).items() if k not in unused})
            log.set_tags({UNUSED_TAG: ", ".join(sorted(unused))})
            log.log_datasets(datasets)
        else:  # the tags of whoever resumes it (a re-queued trial has another number)
            log.set_tags({**tags, "vaelab.resumed_from_epoch": prior.epoch})
    except BaseException as err:  # no run is left RUNNING behind
        log.end(err)
        raise
    opened.timed.seconds = time.perf_counter() - started
    return opened
