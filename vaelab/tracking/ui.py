"""The MLflow UI: links into its model-training view, and `vaelab ui`'s server command."""

from __future__ import annotations

import json
from urllib.parse import quote

from vaelab.tracking.connection import Connection
from vaelab.tracking.uris import without_credentials

UI_BASE = "http://127.0.0.1:5000"  # where `make ui` serves a local store
# MLflow 3's UI opens in its GenAI view unless the URL asks for the model-training one (a browser test
# found no experiment setting that changes that), so every link vaelab writes carries ML_VIEW. The
# experiment kind tag is what the UI's own kind selector sets; vaelab sets it to model development.
ML_VIEW = "?workflowType=machine_learning"


def run_link(ui_base: str, experiment_id: str, run_id: str) -> str:
    """A run's page in the model-training view of the MLflow UI."""
    return f"{ui_base}/#/experiments/{experiment_id}/runs/{run_id}{ML_VIEW}"


def experiment_link(ui_base: str, experiment_id: str) -> str:
    return f"{ui_base}/#/experiments/{experiment_id}{ML_VIEW}"


# The experiment view a sweep shares (an experiment tag the UI reads by its key): runs grouped by the
# configuration they repeat (runlog.CONFIG_TAG), the charts showing each group's mean and min-max band.
CONFIG_VIEW = "by-configuration"
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."  # the UI's own tag prefix for a shared view


def grouped_view_state(tag: str) -> str:
    """The UI state of runs grouped by `tag`, averaged in the charts, as the UI's shared-view tag holds it."""
    group_by = {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": tag}]}
    return json.dumps({"groupBy": group_by, "useGroupedValuesInCharts": True})


def view_link(ui_base: str, experiment_id: str, key: str = CONFIG_VIEW) -> str:
    """An experiment's charts in a shared view (`key`), in the model-training view."""
    return (f"{ui_base}/#/experiments/{experiment_id}/runs{ML_VIEW}&viewStateShareKey={quote(key)}"
            "&compareRunsMode=CHART")


def ui_base_for(tracking_uri: str) -> str:
    """A tracking server serves its own UI; a local store is seen through `make ui`."""
    if tracking_uri.startswith(("http://", "https://")):
        return without_credentials(tracking_uri).rstrip("/")
    return UI_BASE


def ui_command(store: Connection, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """`mlflow server` over `store`, bound to loopback unless asked otherwise."""
    command = ["mlflow", "server", "--backend-store-uri", store.uri, "--host", host, "--port", str(port),
               "--workers", "1"]
    if store.artifact_root is not None:
        command += ["--default-artifact-root", store.artifact_root.as_uri()]
    return command
