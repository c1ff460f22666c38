"""MLflow tracking: the only module that imports mlflow.

Default store: `sqlite:///runs/mlflow.db` with artifacts in `runs/artifacts/`;
`MLFLOW_TRACKING_URI` (or an explicit URI) points elsewhere, e.g. a server. One
experiment per spec name; a run per training run, with the flattened spec as
params, per-epoch metrics logged one batch per epoch, test metrics, figures and
the checkpoint folder as artifacts.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from vaelab.errors import LeaseLost, TrackingError, causes

DEFAULT_STORE_DIR = Path("runs")
FAILURE_TAG = "failure_reason"

UI_BASE = "http://127.0.0.1:5000"  # where `make ui` serves a local store
# MLflow 3's UI opens in its GenAI view unless the URL asks for the model-training one (a browser test
# found no experiment setting that changes that), so every link vaelab writes carries ML_VIEW. The
# experiment kind tag is what the UI's own kind selector sets; vaelab sets it to model development.
ML_VIEW = "?workflowType=machine_learning"
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
NOTE_TAG = "mlflow.note.content"  # the description the UI shows for an experiment or a run


def run_link(ui_base: str, experiment_id: str, run_id: str) -> str:
    """A run's page in the model-training view of the MLflow UI."""
    return f"{ui_base}/#/experiments/{experiment_id}/runs/{run_id}{ML_VIEW}"


def experiment_link(ui_base: str, experiment_id: str) -> str:
    return f"{ui_base}/#/experiments/{experiment_id}{ML_VIEW}"


def quiet_mlflow() -> None:
    """MLflow's own output, set once at the command's entry (before mlflow is imported):
    no schema-migration announcements for a new SQLite store, no artifact upload bars,
    and no "View run" line per run through vaelab's progress bars (vaelab prints the
    run's address itself: Tracker.run_url). A user's own settings win."""
    for noisy in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # A tracking server that is away (restarting, the network down) is retried by MLflow's client for
    # minutes; each retry is said in a line, so a worker that waits is seen waiting, not hung.
    retries = logging.getLogger("urllib3.connectionpool")
    if not any(getattr(h, "vaelab", False) for h in retries.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("vaelab: tracking server unreachable, %(message)s"))
        handler.setLevel(logging.WARNING)
        handler.addFilter(lambda record: record.getMessage().startswith("Retrying"))
        handler.vaelab = True  # type: ignore[attr-defined]
        retries.addHandler(handler)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def without_credentials(uri: str) -> str:
    """`uri` with any user:password@ taken out, for what is printed or written to reports."""
    parts = urlparse(uri)
    if "@" not in parts.netloc:
        return uri
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()


# A run's kept weights as an MLflow LoggedModel: the checkpoint folder (model.pt state dict, spec.yaml,
# metrics.json), read back by vaelab's own weights-only loader; no pickled Python object, no pyfunc.
MODEL_NAME, MODEL_TYPE = "vae", "vaelab-checkpoint"
MODEL_FORMAT_TAG, MODEL_FORMAT = "vaelab.format", "checkpoint-v1"
MODEL_URI_SCHEMES = ("models:/", "runs:/")


def ui_base_for(tracking_uri: str) -> str:
    """A tracking server serves its own UI; a local store is seen through `make ui`."""
    if tracking_uri.startswith(("http://", "https://")):
        return without_credentials(tracking_uri).rstrip("/")
    return UI_BASE


# Errors that mean "the disk said no", wherever they surface (OSError errno, SQLite messages).
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                   errno.ENOTDIR, errno.EEXIST}
_STORAGE_MESSAGES = ("database or disk is full", "readonly database", "unable to open database file",
                     "disk i/o error", "no space left")


def storage_problem(err: BaseException) -> str | None:
    """A one-line description if `err` (or what caused it) is a storage failure, else None."""
    for cause in causes(err):
        if isinstance(cause, OSError) and cause.errno in _STORAGE_ERRNOS:
            where = f" ({cause.filename})" if cause.filename else ""
            return f"cannot write{where}: {cause.strerror or cause}"
        text = str(cause).lower()
        for message in _STORAGE_MESSAGES:
            if message in text:
                return f"the tracking store refused a write: {message}"
    return None


def is_not_found(err: BaseException) -> bool:
    """True if MLflow said the thing asked for does not exist. Anything else (a server
    that does not answer, a locked database) is not "gone" and must not be read as such."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    return isinstance(err, MlflowException) and err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def default_tracking_uri() -> str:
    return f"sqlite:///{(DEFAULT_STORE_DIR / 'mlflow.db').resolve()}"


def resolve_tracking_uri(explicit: str | None = None) -> str:
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def _artifact_root(uri: str) -> Path | None:
    """For a SQLite store, artifacts live in `artifacts/` beside the database
    (a server or other store decides for itself)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):]).parent / "artifacts"


def store_exists(uri: str) -> bool:
    """False only for a SQLite store whose file is not there (reading must not create it)."""
    return not uri.startswith("sqlite:///") or Path(uri[len("sqlite:///"):]).is_file()


def local_path(uri: str) -> Path | None:
    parsed = urlparse(uri)
    return Path(unquote(parsed.path)) if parsed.scheme in ("", "file") else None


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _param_text(value: Any) -> str:
    return "null" if value is None else str(value)


SERVER_CHECK_TIMEOUT_S = 15


def check_server(uri: str) -> None:
    """One request to an http(s) tracking server, with no retries, before anything is recorded: a server
    that cannot be reached, that does not speak TLS when https:// was asked, or that refuses the
    credentials (MLFLOW_TRACKING_USERNAME / _PASSWORD, or ~/.mlflow/credentials) is one TrackingError
    naming the server (never the credentials). Later requests get MLflow's own retries, which ride out a
    server restart."""
    shown = without_credentials(uri)
    try:
        response = _ask_once(uri)
    except Exception as err:  # noqa: BLE001 - MLflow wraps what requests and urllib3 gave up on
        # MLflow's message names the URL as given, user:password@ included: never repeat it.
        reason = _connection_reason(str(err).replace(uri, shown).replace(uri.rstrip("/"), shown))
        if reason in _UNREACHABLE:
            raise TrackingError(f"MLflow server {shown} is unreachable ({reason})") from None
        raise TrackingError(f"MLflow server {shown}: {reason}") from None
    if response.status_code == 401:
        raise TrackingError(f"MLflow server {shown} refused the credentials (HTTP 401): set MLFLOW_TRACKING_USERNAME "
                            "and MLFLOW_TRACKING_PASSWORD, or put them in ~/.mlflow/credentials")
    if response.status_code == 403:
        raise TrackingError(f"MLflow server {shown}: this user may not read experiments (HTTP 403)")
    if response.status_code != 200:
        raise TrackingError(f"MLflow server {shown} answered HTTP {response.status_code} (is it an MLflow server?)")


def _ask_once(uri: str, attempts: int = 4):
    """The check's request. A connection that was made and then cut (a bad network, a proxy restarting) is
    tried again a few times; a refusal, a timeout or a TLS failure is the answer."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    for attempt in range(attempts):
        try:
            return http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "POST",
                                json={"max_results": 1}, max_retries=0, timeout=SERVER_CHECK_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - sorted below
            text = str(err)
            cut = any(m in text for m in ("Connection aborted", "RemoteDisconnected", "Connection reset",
                                          "ConnectionResetError", "BrokenPipe", "IncompleteRead"))
            if not cut or attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


_UNREACHABLE = ("connection refused", "no route to host", "network unreachable", "unknown host name",
                "connection timed out")


def _connection_reason(text: str) -> str:
    """The cause of a failed connection, in a few words (no URL: the caller names the server)."""
    for marker, reason in (("Connection refused", "connection refused"), ("No route to host", "no route to host"),
                           ("Network is unreachable", "network unreachable"),
                           ("Name or service not known", "unknown host name"),
                           ("timed out", "connection timed out"),
                           ("wrong version number", "the TLS handshake failed (it speaks plain HTTP?)")):
        if marker in text:
            return reason
    return text.splitlines()[0][:200] if text else "no answer"


class TrackedRun:
    """Handle on one MLflow run; all writes go through MlflowClient."""

    def __init__(self, client, run_id: str, logged_through: int = 0):
        self.client = client
        self.run_id = run_id
        self.monitor: Any = None  # MLflow's system-metrics sampler, while the run trains
        # Called before every write: a sweep's fencing check (vaelab.sweeps.queue.TrialQueue.check_lease)
        # raises there once the run is no longer this process's to write.
        self.guard: Callable[[], None] = lambda: None
        # A resumed run repeats the epochs after its last saved state; those it had
        # already logged before it was killed are not logged a second time.
        self.logged_through = logged_through

    def log_params(self, params: dict[str, Any]) -> None:
        self.guard()
        from mlflow.entities import Param

        items = [Param(k, _param_text(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.guard()
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """All values in one call (one database transaction)."""
        self.guard()
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        if epoch > self.logged_through:
            self.log_metrics(metrics, step=epoch)

    def log_datasets(self, records: list[dict[str, Any]]) -> None:
        """The run's data as MLflow dataset inputs, one per split, tagged with its context
        (train / validation / test), so the UI shows what a run trained and was tested on."""
        self.guard()
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        inputs = []
        for record in records:
            hub = record["source"].startswith("hf://")
            name, _, revision = record["source"].removeprefix("hf://").partition("@")
            source = ({"path": name, **({"revision": revision} if revision else {})} if hub
                      else {"uri": Path(record["source"]).resolve().as_uri()})
            dataset = Dataset(name=record["name"], digest=record["digest"],
                              source_type="hugging_face" if hub else "local", source=json.dumps(source),
                              profile=json.dumps(record["profile"]))
            inputs.append(DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, record["context"])]))
        self.client.log_inputs(self.run_id, datasets=inputs)

    def start_system_metrics(self, every_s: float) -> None:
        """Sample CPU, memory, disk, network and (through NVML, when there is a GPU) GPU utilisation and
        memory every `every_s` seconds into system/* metrics, in a thread, until the run ends."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        previous = logging.getLogger("mlflow.system_metrics").level
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no "started monitoring" lines
        try:
            monitor = SystemMetricsMonitor(self.run_id, sampling_interval=every_s, samples_before_logging=1,
                                           resume_logging=self.logged_through > 0,
                                           tracking_uri=self.client.tracking_uri)
            monitor.start()
        finally:
            logging.getLogger("mlflow.system_metrics").setLevel(previous)
        self.monitor = monitor

    def stop_system_metrics(self) -> None:
        if self.monitor is not None:
            monitor, self.monitor = self.monitor, None
            logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
            monitor.finish()

    def start_model(self, params: dict[str, Any]) -> str:
        """A LoggedModel (MLflow 3's model object) for this run's weights, PENDING until `finish_model`; the
        test metrics logged with `log_model_metrics` are linked to it. Returns its model id."""
        self.guard()
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        model = self.client.create_logged_model(experiment_id, name=MODEL_NAME, source_run_id=self.run_id,
                                                params={k: _param_text(v) for k, v in params.items()},
                                                tags={MODEL_FORMAT_TAG: MODEL_FORMAT}, model_type=MODEL_TYPE)
        return model.model_id

    def try_start_model(self, params: dict[str, Any]) -> str | None:
        """`start_model`, or None (with a warning) where the store has no LoggedModels (an MLflow 2 server)."""
        try:
            return self.start_model(params)
        except Exception as err:  # noqa: BLE001 - whatever the store says, the run's metrics still go in
            if storage_problem(err):
                raise
            logging.getLogger(__name__).warning("run %s: no MLflow LoggedModel (%s); the checkpoint is still "
                                                "among the run's artifacts", self.run_id,
                                                str(err).splitlines()[0][:200])
            return None

    def log_model_metrics(self, model_id: str, metrics: dict[str, float], step: int) -> None:
        """Metrics of the run that belong to its model too (the UI shows them on the model's page)."""
        self.guard()
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step, model_id=model_id)
                                                    for k, v in metrics.items()])

    def finish_model(self, model_id: str, folder: Path | None, step: int) -> None:
        """Upload the checkpoint folder into the model and mark it READY (FAILED when there is no folder),
        and record it as the run's output."""
        self.guard()
        from mlflow.entities import LoggedModelOutput

        if folder is None:
            self.client.finalize_logged_model(model_id, "FAILED")
            return
        self.client.log_model_artifacts(model_id, str(folder))
        self.client.finalize_logged_model(model_id, "READY")
        self.client.log_outputs(self.run_id, [LoggedModelOutput(model_id, step)])

    def log_image(self, path: Path, key: str, step: int) -> None:
        """A picture under `key` at `step` (MLflow's image logging): the UI shows a slider over the steps."""
        self.guard()
        from PIL import Image

        with Image.open(path) as image:
            self.client.log_image(self.run_id, image.convert("RGB"), key=key, step=step, synchronous=True)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.guard()
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        self.guard()
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    @property
    def artifact_uri(self) -> str:
        return self.client.get_run(self.run_id).info.artifact_uri


class Tracker:
    """Creates experiments and runs in one tracking store."""

    def __init__(self, tracking_uri: str | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = resolve_tracking_uri(tracking_uri)
        root = _artifact_root(self.uri)
        self.artifact_root = root
        if root is None:
            if self.uri.startswith(("http://", "https://")):
                check_server(self.uri)
            self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
            return
        try:
            root.mkdir(parents=True, exist_ok=True)
            # Opening a new SQLite store runs schema migrations; two workers doing it at
            # once corrupt each other, so they take turns.
            with open(root.parent / ".mlflow-init.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
                self.client.search_experiments(max_results=1)
        except Exception as err:
            problem = storage_problem(err) or str(err).strip().splitlines()[0][:200]
            raise TrackingError(f"tracking store {root.parent}/: {problem}") from None

    def experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = (self.artifact_root / name).as_uri() if self.artifact_root else None
        try:
            return self.client.create_experiment(name, artifact_location=location,
                                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:
            # Another process created it first.
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def describe_experiment(self, name: str, description: str) -> str:
        """The experiment of a spec, with the spec's description as its note (shown in the UI) and marked
        as model development; returns its id."""
        experiment_id = self.experiment_id(name)
        tags = self.client.get_experiment(experiment_id).tags
        wanted = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, **({NOTE_TAG: description.strip()} if description else {})}
        for key, value in wanted.items():
            if tags.get(key) != value:
                self.client.set_experiment_tag(experiment_id, key, value)
        return experiment_id

    def open_run(self, experiment: str, run_name: str, tags: dict[str, Any] | None = None) -> TrackedRun:
        """A RUNNING run; the caller ends it with `end_run` (stacked runs end one by one)."""
        all_tags = {"vaelab.git_commit": git_commit(), **(tags or {})}
        info = self.client.create_run(
            self.experiment_id(experiment), run_name=run_name, tags={k: str(v) for k, v in all_tags.items()}
        )
        return TrackedRun(self.client, info.info.run_id)

    def end_run(self, run: TrackedRun, error: BaseException | None = None) -> None:
        """FINISHED without an error; KILLED on Ctrl-C; otherwise the error's
        `mlflow_status` (vaelab.errors: a pruned run is KILLED) or FAILED, with the reason as a tag."""
        try:
            if isinstance(error, LeaseLost):  # the run is another worker's now: it marked it KILLED
                return
            run.guard()
            self._mark_ended(run, error)  # the status first: a sampler that is slow to stop must not delay it
        finally:
            try:
                run.stop_system_metrics()
            except Exception as err:  # a sampler that cannot stop cleanly must not change how the run ended
                logging.getLogger(__name__).warning("system metrics of run %s: %s", run.run_id, err)

    def _mark_ended(self, run: TrackedRun, error: BaseException | None) -> None:
        if error is None:
            self.client.set_terminated(run.run_id, status="FINISHED")
            return
        if isinstance(error, KeyboardInterrupt):
            reason, status = str(error) or "interrupted (KeyboardInterrupt)", "KILLED"
        else:
            reason, status = f"{type(error).__name__}: {error}".strip(), getattr(error, "mlflow_status", "FAILED")
        try:
            self.client.set_tag(run.run_id, FAILURE_TAG, reason[:5000])
            self.client.set_terminated(run.run_id, status=status)
        except Exception as secondary:  # e.g. the disk that failed the run is still full: keep the first error
            logging.getLogger(__name__).warning("could not mark run %s %s: %s", run.run_id, status, secondary)

    @property
    def shown_uri(self) -> str:
        """The store's URI as printed: without a user:password@ part."""
        return without_credentials(self.uri)

    def run_url(self, run_id: str) -> str:
        """The run's page in the MLflow UI (for a local store, once `make ui` serves it)."""
        experiment_id = self.client.get_run(run_id).info.experiment_id
        return run_link(ui_base_for(self.uri), experiment_id, run_id)

    @property
    def resume_root(self) -> Path:
        """Where runs keep their resumable training state: beside a SQLite store, else ./runs/resume."""
        return (self.artifact_root.parent if self.artifact_root else DEFAULT_STORE_DIR) / "resume"

    def reopen_run(self, run_id: str) -> TrackedRun | None:
        """Continue a run that did not finish (killed, crashed): RUNNING again, with
        what it already logged. None if the run is gone or finished."""
        try:
            run = self.client.get_run(run_id)
        except Exception as err:
            if is_not_found(err):
                return None
            raise
        if run.info.status == "FINISHED":
            return None
        self.client.update_run(run_id, status="RUNNING")
        if FAILURE_TAG in run.data.tags:
            self.client.delete_tag(run_id, FAILURE_TAG)
        # An epoch's metrics go in one batch, so train/loss's last step is the last epoch logged.
        steps = [m.step for m in self.client.get_metric_history(run_id, "train/loss")]
        return TrackedRun(self.client, run_id, logged_through=max(steps, default=0))

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

    def attach(self, run_id: str) -> TrackedRun:
        """A handle that writes into an existing run as it is (a finished run's later evaluation)."""
        return TrackedRun(self.client, run_id)

    def model_folder(self, uri: str, dest: Path) -> Path:
        """The checkpoint folder behind a `models:/<name>/<version>`, `models:/<model id>` or `runs:/<run id>`
        URI, downloaded into `dest`; CheckpointError (one line) if there is no such model or it is not
        vaelab's. Nothing is unpickled here: the folder is read by checkpoint.load_checkpoint."""
        import mlflow
        import mlflow.artifacts
        from mlflow.exceptions import MlflowException

        from vaelab.errors import CheckpointError

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

    def register_best(self, experiment: str, metric: str, ascending: bool, name: str) -> tuple[str, str, str, float]:
        """Put the FINISHED run of `experiment` with the best `metric` in the Model Registry as a new version
        of `name` (its LoggedModel, else its checkpoint folder). Returns (name, version, run id, value)."""
        import mlflow
        from mlflow.exceptions import MlflowException

        # The registry resolves a models:/<id> source through the process's tracking URI, not the client's.
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        found = self.client.get_experiment_by_name(experiment)
        ranked = self.best_runs(experiment, metric, ascending, 1) if found is not None else []
        if not ranked:
            raise TrackingError(f"no finished runs of '{experiment}' with {metric} in {self.shown_uri}")
        run = self.client.get_run(ranked[0])
        models = self.client.search_logged_models([run.info.experiment_id],
                                                  filter_string=f"source_run_id = '{run.info.run_id}'")
        ready = [m for m in models if str(m.status) in ("READY", "LoggedModelStatus.READY")]
        source = f"models:/{ready[0].model_id}" if ready else f"runs:/{run.info.run_id}/checkpoint"
        try:
            self.client.create_registered_model(name, description=f"vaelab VAEs of '{experiment}'")
        except MlflowException as err:
            taken = "RESOURCE_ALREADY_EXISTS" in str(getattr(err, "error_code", "")) or "already exists" in str(err)
            if not taken:
                raise
        version = self.client.create_model_version(
            name, source=source, run_id=run.info.run_id, model_id=ready[0].model_id if ready else None,
            tags={"vaelab.metric": metric, "vaelab.value": str(run.data.metrics[metric])},
            description=f"the run of '{experiment}' with the {'lowest' if ascending else 'highest'} {metric}")
        return name, str(version.version), run.info.run_id, float(run.data.metrics[metric])

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

    def kill_run(self, run_id: str, reason: str) -> None:
        """Mark a run whose process died as KILLED (no RUNNING leftovers)."""
        try:
            if self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_tag(run_id, FAILURE_TAG, reason)
                self.client.set_terminated(run_id, status="KILLED")
        except Exception as err:  # the run may live in another store; nothing to clean here
            if not is_not_found(err):
                raise

    def create_parent_run(self, experiment: str, run_name: str, params: dict[str, Any],
                          tags: dict[str, Any]) -> str:
        """A RUNNING run that groups a sweep's child runs."""
        info = self.client.create_run(self.experiment_id(experiment), run_name=run_name,
                                      tags={"vaelab.git_commit": git_commit(), **{k: str(v) for k, v in tags.items()}})
        TrackedRun(self.client, info.info.run_id).log_params(params)
        return info.info.run_id

    def run_exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except Exception as err:
            if is_not_found(err):
                return False
            raise

    def set_status(self, run_id: str, status: str) -> None:
        if status == "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        else:
            self.client.set_terminated(run_id, status=status)

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

    def ui_command(self, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
        """`mlflow ui` over this store, bound to loopback unless asked otherwise."""
        command = ["mlflow", "server", "--backend-store-uri", self.uri, "--host", host, "--port", str(port),
                   "--workers", "1"]
        if self.artifact_root is not None:
            command += ["--default-artifact-root", self.artifact_root.as_uri()]
        return command
