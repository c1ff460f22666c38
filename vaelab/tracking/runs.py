"""Where MLflow run logs are opened: `MlflowRuns`, the MLflow implementation of
`vaelab.runlog.RunLogs`. Experiments (kind, description), runs opened, reopened to resume
or attached as they are, a sweep's parent run, and run status set from outside the run
(a dead worker's run KILLED), the finished run of a run hash. The first write makes a SQLite store that is
not there yet."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from typing import Any

from vaelab.runlog import FAILURE_TAG, HASH_TAG, FinishedRun
from vaelab.tracking.connection import Connection
from vaelab.tracking.server import is_not_found
from vaelab.tracking.ui import SHARED_VIEW_PREFIX
from vaelab.tracking.writer import MlflowRunLog

EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
NOTE_TAG = "mlflow.note.content"  # the description the UI shows for an experiment or a run


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class MlflowRuns(Connection):
    """Creates experiments and runs in one tracking store, and hands out their logs."""

    def experiment_id(self, name: str) -> str:
        found = self.writable.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = (self.artifact_root / name).as_uri() if self.artifact_root else None
        try:
            return self.writable.create_experiment(name, artifact_location=location,
                                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:
            # Another process created it first.
            found = self.writable.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def describe_experiment(self, name: str, description: str) -> str:
        """The experiment of a spec, with the spec's description as its note (shown in the UI) and marked
        as model development; returns its id."""
        experiment_id = self.experiment_id(name)
        tags = self.writable.get_experiment(experiment_id).tags
        wanted = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, **({NOTE_TAG: description.strip()} if description else {})}
        for key, value in wanted.items():
            if tags.get(key) != value:
                self.writable.set_experiment_tag(experiment_id, key, value)
        return experiment_id

    def share_view(self, experiment: str, key: str, state: str) -> str:
        """An experiment view the MLflow UI opens by `key` (vaelab.tracking.ui.view_link): `state` is its UI
        state as JSON (e.g. ui.grouped_view_state). Returns the experiment's id."""
        experiment_id = self.experiment_id(experiment)
        tag = f"{SHARED_VIEW_PREFIX}{key}"
        if self.writable.get_experiment(experiment_id).tags.get(tag) != state:
            self.writable.set_experiment_tag(experiment_id, tag, state)
        return experiment_id

    def open_run(self, experiment: str, run_name: str, tags: Mapping[str, Any] | None = None) -> MlflowRunLog:
        """A RUNNING run; the caller ends it with `MlflowRunLog.end` (stacked runs end one by one)."""
        all_tags = {"vaelab.git_commit": git_commit(), **(tags or {})}
        info = self.writable.create_run(
            self.experiment_id(experiment), run_name=run_name, tags={k: str(v) for k, v in all_tags.items()}
        )
        return MlflowRunLog(self.writable, info.info.run_id)

    def reopen_run(self, run_id: str) -> MlflowRunLog | None:
        """Continue a run that did not finish (killed, crashed): RUNNING again, with
        what it already logged. None if the run is gone or finished."""
        try:
            run = self.writable.get_run(run_id)
        except Exception as err:
            if is_not_found(err):
                return None
            raise
        if run.info.status == "FINISHED":
            return None
        self.writable.update_run(run_id, status="RUNNING")
        if FAILURE_TAG in run.data.tags:
            self.writable.delete_tag(run_id, FAILURE_TAG)
        # An epoch's metrics go in one batch, so train/loss's last step is the last epoch logged.
        steps = [m.step for m in self.writable.get_metric_history(run_id, "train/loss")]
        return MlflowRunLog(self.writable, run_id, logged_through=max(steps, default=0))

    def latest_finished(self, experiment: str, run_hash: str) -> FinishedRun | None:
        """The FINISHED run of `experiment` tagged with `run_hash` (the latest, if copies were trained), or None;
        asking makes no store."""
        if not self.exists:
            return None
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            return None
        where = f"tags.`{HASH_TAG}` = '{run_hash}' and attributes.status = 'FINISHED'"
        runs = self.client.search_runs([found.experiment_id], filter_string=where,
                                       order_by=["attributes.end_time DESC"], max_results=1)
        if not runs:
            return None
        return FinishedRun(runs[0].info.run_id, dict(runs[0].data.metrics), runs[0].info.artifact_uri)

    def finished_children(self, parent: str, run_hash: str) -> list[tuple[FinishedRun, dict[str, str]]]:
        """The FINISHED child runs of the sweep run `parent` tagged with `run_hash`, oldest first, each with its
        tags: a retried point's earlier attempt that finished before its worker died (vaelab.sweeps.trials)."""
        parent_run = self.client.get_run(parent)
        where = (f"tags.`mlflow.parentRunId` = '{parent}' and tags.`{HASH_TAG}` = '{run_hash}' "
                 "and attributes.status = 'FINISHED'")
        runs = self.client.search_runs([parent_run.info.experiment_id], filter_string=where,
                                       order_by=["attributes.end_time ASC"])
        return [(FinishedRun(r.info.run_id, dict(r.data.metrics), r.info.artifact_uri), dict(r.data.tags))
                for r in runs]

    def latest_finished_in(self, experiment: str) -> FinishedRun | None:
        """The latest FINISHED run of `experiment`, whatever its run hash, or None; asking makes no store."""
        if not self.exists:
            return None
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            return None
        runs = self.client.search_runs([found.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                       order_by=["attributes.end_time DESC"], max_results=1)
        if not runs:
            return None
        return FinishedRun(runs[0].info.run_id, dict(runs[0].data.metrics), runs[0].info.artifact_uri)

    def attach(self, run_id: str) -> MlflowRunLog:
        """A handle that writes into an existing run as it is (a finished run's later evaluation, a sweep's
        outcome published on its parent run)."""
        return MlflowRunLog(self.writable, run_id)

    def create_parent_run(self, experiment: str, run_name: str, params: dict[str, Any],
                          tags: dict[str, Any]) -> str:
        """A RUNNING run that groups a sweep's child runs."""
        info = self.writable.create_run(self.experiment_id(experiment), run_name=run_name,
                                      tags={"vaelab.git_commit": git_commit(), **{k: str(v) for k, v in tags.items()}})
        MlflowRunLog(self.writable, info.info.run_id).log_params(params)
        return info.info.run_id

    def kill_run(self, run_id: str, reason: str) -> None:
        """Mark a run whose process died as KILLED (no RUNNING leftovers)."""
        try:
            if self.writable.get_run(run_id).info.status == "RUNNING":
                self.writable.set_tag(run_id, FAILURE_TAG, reason)
                self.writable.set_terminated(run_id, status="KILLED")
        except Exception as err:  # the run may live in another store; nothing to clean here
            if not is_not_found(err):
                raise

    def set_status(self, run_id: str, status: str) -> None:
        if status == "RUNNING":
            self.writable.update_run(run_id, status="RUNNING")
        else:
            self.writable.set_terminated(run_id, status=status)
