"""MLflow tracking: the only package that imports mlflow, and only inside functions, so
importing it costs nothing until a store is opened.

Default store: `sqlite:///runs/mlflow.db` with artifacts in `runs/artifacts/`, made by the first
write (never by a read: a store that is not there is a one-line TrackingError);
`MLFLOW_TRACKING_URI` (or an explicit URI) points elsewhere, e.g. a server. One
experiment per spec name; a run per training run, with the flattened spec as
params, per-epoch metrics logged one batch per epoch, test metrics, figures and
the checkpoint folder as artifacts.

- `uris`: where a store is (URI, artifacts beside a SQLite store, credentials taken out)
- `server`: MLflow's output quietened, a server checked once, MLflow's errors read
- `connection`: one store opened once (`Connection`)
- `writer`: one run's writes (`MlflowRunLog`, a `vaelab.runlog.RunLog`)
- `runs`: experiments and runs opened, reopened, attached, ended from outside (`MlflowRuns`,
  a `vaelab.runlog.RunLogs`)
- `store`: reads (`Store`: runs for reports and evaluations, downloads, UI links)
- `model_registry`: `register_best`
- `ui`: links into the UI's model-training view, `vaelab ui`'s command
"""

from vaelab.runlog import FAILURE_TAG, local_path
from vaelab.tracking.model_registry import register_best
from vaelab.tracking.runs import NOTE_TAG, MlflowRuns
from vaelab.tracking.server import check_server, quiet_mlflow, storage_problem
from vaelab.tracking.store import Store
from vaelab.tracking.ui import ML_VIEW, UI_BASE, run_link, ui_base_for, ui_command
from vaelab.tracking.uris import resolve_tracking_uri, store_exists, without_credentials
from vaelab.tracking.writer import MlflowRunLog


class Tracker(Store, MlflowRuns):
    """One tracking store opened once, for a command that both reads it (`Store`) and writes runs into it
    (`MlflowRuns`): `vaelab train`, a sweep, a report published on its parent run, a later evaluation.
    Code that only reads or only writes asks for that half. A SQLite store that is not there yet is made by
    its first write; a read before that is a TrackingError (so `vaelab evaluate` or `sample` in the wrong
    folder makes nothing)."""

    creates = True


__all__ = ["FAILURE_TAG", "local_path", "register_best", "NOTE_TAG", "MlflowRuns", "check_server", "quiet_mlflow",
           "storage_problem", "Store", "ML_VIEW", "UI_BASE", "run_link", "ui_base_for", "ui_command",
           "resolve_tracking_uri", "store_exists", "without_credentials", "MlflowRunLog", "Tracker"]
