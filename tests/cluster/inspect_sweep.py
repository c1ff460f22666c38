"""What a sweep left in the shared stack, as JSON on stdout: every trial (state, point, worker, MLflow run,
why it was reaped) and every child run of the study's experiment (status, run hash, per-epoch steps of
each metric). Runs inside the services' namespace (`python tests/cluster/inspect_sweep.py NAME`), with the
same environment a worker has (VAELAB_STORAGE, MLFLOW_TRACKING_URI, credentials)."""

from __future__ import annotations

import json
import os
import sys

import optuna
from mlflow.tracking import MlflowClient

EPOCH_METRICS = ("train/loss", "val/loss")


def main(name: str) -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    names = optuna.get_all_study_names(os.environ["VAELAB_STORAGE"])
    out: dict = {"study": name in names, "trials": [], "runs": []}
    if name in names:
        study = optuna.load_study(study_name=name, storage=os.environ["VAELAB_STORAGE"])
        out["trials"] = [{"number": t.number, "state": t.state.name, "point": t.user_attrs.get("grid_point"),
                          "worker": t.user_attrs.get("worker"), "run": t.user_attrs.get("mlflow_run_id"),
                          "died": t.user_attrs.get("worker_died")} for t in study.trials]
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        for run in client.search_runs([experiment.experiment_id], max_results=1000):
            if "mlflow.parentRunId" not in run.data.tags:
                continue
            steps = {key: [m.step for m in client.get_metric_history(run.info.run_id, key)]
                     for key in EPOCH_METRICS}
            out["runs"].append({"run": run.info.run_id, "status": run.info.status,
                                "point": run.data.tags.get("vaelab.run_hash"), "steps": steps})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
