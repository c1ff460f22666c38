"""The MLflow Model Registry: `vaelab register` puts a study's best finished run in it."""

from __future__ import annotations

from vaelab.errors import TrackingError
from vaelab.runlog import KEPT_TAG
from vaelab.tracking.store import Store


def register_best(store: Store, experiment: str, metric: str, ascending: bool,
                  name: str) -> tuple[str, str, str, float]:
    """Put the FINISHED run of `experiment` with the best `metric` in the Model Registry as a new version
    of `name` (its LoggedModel, else its checkpoint folder). Returns (name, version, run id, value)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = store.client
    # The registry resolves a models:/<id> source through the process's tracking URI, not the client's.
    mlflow.set_tracking_uri(store.uri)
    mlflow.set_registry_uri(store.uri)
    ranked = store.best_runs(experiment, metric, ascending, 1)
    if not ranked:
        raise TrackingError(f"no finished runs of '{experiment}' with {metric} in {store.shown_uri}")
    run = client.get_run(ranked[0])
    models = client.search_logged_models([run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run.info.run_id}'")
    ready = [m for m in models if str(m.status) in ("READY", "LoggedModelStatus.READY")
             and KEPT_TAG not in m.tags]  # the run's final model, not one kept while it trained
    source = f"models:/{ready[0].model_id}" if ready else f"runs:/{run.info.run_id}/checkpoint"
    try:
        client.create_registered_model(name, description=f"vaelab VAEs of '{experiment}'")
    except MlflowException as err:
        taken = "RESOURCE_ALREADY_EXISTS" in str(getattr(err, "error_code", "")) or "already exists" in str(err)
        if not taken:
            raise
    version = client.create_model_version(
        name, source=source, run_id=run.info.run_id, model_id=ready[0].model_id if ready else None,
        tags={"vaelab.metric": metric, "vaelab.value": str(run.data.metrics[metric])},
        description=f"the run of '{experiment}' with the {'lowest' if ascending else 'highest'} {metric}")
    return name, str(version.version), run.info.run_id, float(run.data.metrics[metric])
