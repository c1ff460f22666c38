"""What is read from an MLflow tracking store: `Store`. Finished runs for a later evaluation, the
best runs of an experiment, a whole experiment as a table for the report, a run's artifact, a
`models:/` or `runs:/` checkpoint downloaded, a run's page in the UI. Reading makes no store: a
SQLite store that is not there is a one-line TrackingError (`Store` alone: as it is opened)."""

from __future__ import annotations

from pathlib import Path

from vaelab.errors import CheckpointError, TrackingError
from vaelab.tracking.connection import Connection
from vaelab.tracking.server import is_not_found
from vaelab.tracking.ui import run_link, ui_base_for

MODEL_URI_SCHEMES = ("models:/", "runs:/")


class Store(Connection):
    """Reads from one tracking store (`vaelab ui`); one that is not there is refused as it is opened."""

    creates = False

    def run_url(self, run_id: str) -> str:
        """The run's page in the MLflow UI (for a local store, once `make ui` serves it)."""
        experiment_id = self.client.get_run(run_id).info.experiment_id
        return run_link(ui_base_for(self.uri), experiment_id, run_id)

    def run_exists(self, run_id: str) -> bool:
        if not self.exists:  # no store, no run (and asking makes no store)
            return False
        try:
            self.client.get_run(run_id)
            return True
        except Exception as err:
            if is_not_found(err):
                return False
            raise

    def finished_run(self, run_id: str):
        """A FINISHED run (MLflow's Run: info, data.metrics, data.tags), for evaluating it
        later; TrackingError if there is no such run or it did not finish."""
        try:
            run = self.client.get_run(run_id)
        except Exception as err:
            if is_not_found(err):
                raise TrackingError(f"{run_id}: no such MLflow run in {self.shown_uri}") from None
            raise
        if run.info.status != "FINISHED":
            raise TrackingError(f"{run_id}: the run is {run.info.status}; only FINISHED runs are evaluated")
        return run

    def best_runs(self, experiment: str, metric: str, ascending: bool, n: int, parent: str | None = None) -> list[str]:
        """Ids of the n FINISHED runs of `experiment` (children of `parent`, if given) with the best `metric`."""
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            return []
        order = "ASC" if ascending else "DESC"
        where = "attributes.status = 'FINISHED'" + (f" and tags.mlflow.parentRunId = '{parent}'" if parent else "")
        runs = self.client.search_runs([found.experiment_id], filter_string=where,
                                       order_by=[f"metrics.`{metric}` {order}"], max_results=50_000)
        return [r.info.run_id for r in runs if metric in r.data.metrics][:n]

    def runs_table(self, experiment: str):
        """Every run of an experiment as a pandas DataFrame (columns run_id, status,
        run_name, start_time, end_time, artifact_uri, params.*, metrics.*, tags.*),
        with the experiment id; (None, None) if there is no such experiment."""
        import pandas as pd

        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            return None, None
        rows = []
        for run in self.client.search_runs([found.experiment_id], max_results=50_000):
            row = {"run_id": run.info.run_id, "status": run.info.status, "run_name": run.info.run_name,
                   "start_time": run.info.start_time, "end_time": run.info.end_time,
                   "artifact_uri": run.info.artifact_uri}
            row.update({f"params.{k}": v for k, v in run.data.params.items()})
            row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
            row.update({f"tags.{k}": v for k, v in run.data.tags.items()})
            rows.append(row)
        return found.experiment_id, pd.DataFrame(rows)

    def fetch_artifact(self, run_id: str, path: str, dest: Path) -> Path | None:
        """Copy one artifact of a run (local store or server) into `dest`; None if absent."""
        try:
            return Path(self.client.download_artifacts(run_id, path, str(dest)))
        except OSError:  # a local store without that file
            return None
        except Exception as err:
            if is_not_found(err):
                return None
            raise

    def model_folder(self, uri: str, dest: Path) -> Path:
        """The checkpoint folder behind a `models:/<name>/<version>`, `models:/<model id>` or `runs:/<run id>`
        URI, downloaded into `dest`; CheckpointError (one line) if there is no such model or it is not
        vaelab's. Nothing is unpickled here: the folder is read by checkpoint.load_checkpoint."""
        import mlflow
        import mlflow.artifacts
        from mlflow.exceptions import MlflowException

        if not self.exists:  # MLflow's download would make the store
            raise self.missing()
        if uri.startswith("runs:/") and uri.rstrip("/").count("/") == 1:
            uri = uri.rstrip("/") + "/checkpoint"  # a run's checkpoint folder
        # models:/ URIs are resolved through the process's tracking and registry URIs.
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest),
                                                             tracking_uri=self.uri, registry_uri=self.uri))
        except MlflowException as err:
            why = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"{uri}: no such model in {self.shown_uri} ({why})") from None
        except OSError as err:
            raise CheckpointError(f"{uri}: cannot fetch it ({err})") from None
        if not (local / "model.pt").is_file() or not (local / "spec.yaml").is_file():
            raise CheckpointError(f"{uri}: not a vaelab model (no model.pt and spec.yaml in it); vaelab loads "
                                  "only its own checkpoints")
        return local
