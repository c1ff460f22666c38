"""One MLflow run's writes: `MlflowRunLog`, the MLflow implementation of `vaelab.runlog.RunLog`.
Params, metrics one batch per step, tags, the run's data as dataset inputs, images with steps,
artifacts, system metrics, the run's LoggedModel, and how the run ended. Every write goes through
MlflowClient after `guard()` (a sweep's fencing)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from vaelab.runlog import FAILURE_TAG, KEPT_TAG, ended_as, kept_name
from vaelab.tracking.server import storage_problem

# A run's kept weights as an MLflow LoggedModel: the checkpoint folder (model.pt state dict, spec.yaml,
# metrics.json), read back by vaelab's own weights-only loader; no pickled Python object, no pyfunc.
MODEL_NAME, MODEL_TYPE = "vae", "vaelab-checkpoint"
MODEL_FORMAT_TAG, MODEL_FORMAT = "vaelab.format", "checkpoint-v1"


DATASET_RACE_TRIES = 5


def _lost_insert_race(err: BaseException) -> bool:
    """Whether `err` is a unique-key violation (SQLite's or PostgreSQL's, directly or through a tracking
    server's reply): another writer inserted the same row between our look and our insert."""
    text = str(err)
    return any(mark in text for mark in ("UNIQUE constraint failed", "duplicate key value violates unique"))


def param_text(value: Any) -> str:
    return "null" if value is None else str(value)


class MlflowRunLog:
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

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.guard()
        from mlflow.entities import Param

        items = [Param(k, param_text(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.guard()
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """All values in one call (one database transaction)."""
        self.guard()
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
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
        for attempt in range(DATASET_RACE_TRIES):
            try:
                self.client.log_inputs(self.run_id, datasets=inputs)
                return
            except Exception as err:
                # MLflow looks a dataset up, then inserts it if missing: two workers logging the same data at once
                # both miss it, and the second insert breaks the unique key. Its transaction was rolled back, so
                # the call is tried again, and then finds the dataset the other worker added.
                if not _lost_insert_race(err) or attempt == DATASET_RACE_TRIES - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))

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

    def start_model(self, params: Mapping[str, Any]) -> str:
        """A LoggedModel (MLflow 3's model object) for this run's weights, PENDING until `finish_model`; the
        test metrics logged with `log_model_metrics` are linked to it. Returns its model id."""
        self.guard()
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        model = self.client.create_logged_model(experiment_id, name=MODEL_NAME, source_run_id=self.run_id,
                                                params={k: param_text(v) for k, v in params.items()},
                                                tags={MODEL_FORMAT_TAG: MODEL_FORMAT}, model_type=MODEL_TYPE)
        return model.model_id

    def try_start_model(self, params: Mapping[str, Any]) -> str | None:
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

    def log_model_metrics(self, model_id: str, metrics: Mapping[str, float], step: int) -> None:
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

    def keep_model(self, folder: Path, step: int, params: Mapping[str, Any], tags: Mapping[str, Any]) -> str | None:
        """A LoggedModel named `epoch-NNNN`, READY with `folder`, recorded as the run's output at `step` (the UI
        lists it on the run's page at that step); None, once warned, where the store has no LoggedModels."""
        self.guard()
        from mlflow.entities import LoggedModelOutput

        try:
            experiment_id = self.client.get_run(self.run_id).info.experiment_id
            model = self.client.create_logged_model(
                experiment_id, name=kept_name(step), source_run_id=self.run_id, model_type=MODEL_TYPE,
                params={k: param_text(v) for k, v in params.items()},
                tags={MODEL_FORMAT_TAG: MODEL_FORMAT, KEPT_TAG: str(step), **{k: str(v) for k, v in tags.items()}})
        except Exception as err:  # noqa: BLE001 - as try_start_model: a store without LoggedModels keeps none
            if storage_problem(err):
                raise
            logging.getLogger(__name__).warning("run %s: no MLflow LoggedModel for epoch %d (%s); checkpoints are "
                                                "not kept", self.run_id, step, str(err).splitlines()[0][:200])
            return None
        try:
            self.client.log_model_artifacts(model.model_id, str(folder))
            self.client.finalize_logged_model(model.model_id, "READY")
            self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step)])
        except BaseException:
            try:
                self.client.finalize_logged_model(model.model_id, "FAILED")  # never left PENDING
            except Exception:  # noqa: BLE001 - the store that failed the upload: the first error is the one to see
                pass
            raise
        return model.model_id

    def kept_models(self) -> dict[int, str]:
        """This run's LoggedModels tagged as kept (deleted ones are not found), by step. One left PENDING by a
        process killed mid-upload is marked FAILED (its epoch is kept again), so no record stays pending."""
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        found: dict[int, str] = {}
        token = None
        while True:
            page = self.client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{self.run_id}'",
                                                    page_token=token)
            for model in page:
                step = model.tags.get(KEPT_TAG, "")
                if step.isdigit() and str(model.status).endswith("READY"):
                    found[int(step)] = model.model_id
                elif step.isdigit() and str(model.status).endswith("PENDING"):
                    self.guard()
                    self.client.finalize_logged_model(model.model_id, "FAILED")
            token = page.token
            if not token:
                return found

    def drop_model(self, model_id: str) -> None:
        """The model's files deleted, then its record (MLflow's delete only marks it: `mlflow gc` would be needed to
        free the disk)."""
        self.guard()
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        location = self.client.get_logged_model(model_id).artifact_location
        try:
            get_artifact_repository(location, tracking_uri=self.client.tracking_uri).delete_artifacts()
        except Exception as err:  # noqa: BLE001 - a store that cannot delete files still drops the record
            if storage_problem(err):
                raise
            logging.getLogger(__name__).warning("model %s: its files could not be deleted (%s)", model_id,
                                                str(err).splitlines()[0][:200])
        self.client.delete_logged_model(model_id)

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

    def end(self, error: BaseException | None = None) -> None:
        """FINISHED without an error; KILLED on Ctrl-C; otherwise the error's `mlflow_status`
        (vaelab.errors: a pruned run is KILLED) or FAILED, with the reason as a tag. A run whose
        lease was lost is left as it is: it is another worker's now, which marked it KILLED."""
        try:
            ended = ended_as(error)
            if ended is None:
                return
            self.guard()
            self._mark_ended(*ended)  # the status first: a sampler that is slow to stop must not delay it
        finally:
            try:
                self.stop_system_metrics()
            except Exception as err:  # a sampler that cannot stop cleanly must not change how the run ended
                logging.getLogger(__name__).warning("system metrics of run %s: %s", self.run_id, err)

    def _mark_ended(self, status: str, reason: str) -> None:
        if status == "FINISHED":
            self.client.set_terminated(self.run_id, status="FINISHED")
            return
        try:
            self.client.set_tag(self.run_id, FAILURE_TAG, reason[:5000])
            self.client.set_terminated(self.run_id, status=status)
        except Exception as secondary:  # e.g. the disk that failed the run is still full: keep the first error
            logging.getLogger(__name__).warning("could not mark run %s %s: %s", self.run_id, status, secondary)
