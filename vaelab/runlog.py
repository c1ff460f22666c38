"""What a run writes, as a small interface: params, metrics by step, tags, pictures, files,
its data, the record of its model, and how it ended. The runner talks only to this, so a
whole run (train -> evaluate -> figures -> checkpoint) needs no tracking store.

Two implementations (the shape of torchtune's metric loggers: one small interface, the
heavy backend imported only where it is used):
- `vaelab.tracking.MlflowRunLog`, opened by `vaelab.tracking.Tracker`: an MLflow run;
- `MemoryRunLog`, opened by `MemoryRuns`: everything kept in dicts, files copied into a
  folder; for tests where MLflow is not the subject, and `vaelab train --no-track`.

This module imports neither mlflow nor torch.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from vaelab.errors import LeaseLost

FAILURE_TAG = "failure_reason"  # why a run that did not finish ended
HASH_TAG = "vaelab.run_hash"  # a run's identity (`RunSpec.hash`): its resume state and finished twin are found by it
# The configuration a sweep's run repeats (its point without the seed): MLflow's run grouping by it shows each
# configuration's seeds as one group, with their mean and spread in the charts (vaelab.tracking.ui.CONFIG_VIEW).
CONFIG_TAG = "vaelab.config"
COPY_TAG = "vaelab.copy_of"  # a run trained again on purpose (`vaelab train --again`): the finished run it copies
KEPT_TAG = "vaelab.kept_epoch"  # on a model kept while the run trained (train.keep_every / keep_best): its epoch
KEPT_DIR = "kept"  # the run's folder of kept checkpoints, where the store has no model records of its own


def kept_name(step: int) -> str:
    """A kept checkpoint's name: its folder under KEPT_DIR (--no-track), its model's name in MLflow."""
    return f"epoch-{step:04d}"


class RunLog(Protocol):
    """One run's record, written as the run goes. Every write first calls `guard()` (a sweep's
    fencing: it raises LeaseLost once the run is another worker's)."""

    run_id: str
    guard: Callable[[], None]

    @property
    def artifact_uri(self) -> str: ...  # where the run's files went (a file: URI when local)

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """All values at one step, together (one transaction where the store has them)."""

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """An epoch's metrics, unless a resumed run had logged that epoch before it was killed."""

    def log_datasets(self, records: list[dict[str, Any]]) -> None:
        """The run's data, one record per split (`vaelab.data.ImageData.records`)."""

    def log_image(self, path: Path, key: str, step: int) -> None: ...

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None: ...

    def try_start_model(self, params: Mapping[str, Any]) -> str | None:
        """A record of the run's kept weights, PENDING until `finish_model`; its id, or None where the
        store keeps no such records (the checkpoint is still among the run's files)."""

    def log_model_metrics(self, model_id: str, metrics: Mapping[str, float], step: int) -> None:
        """Metrics of the run that belong to its model too."""

    def finish_model(self, model_id: str, folder: Path | None, step: int) -> None:
        """The model's checkpoint folder, and the model READY; FAILED when `folder` is None."""

    def keep_model(self, folder: Path, step: int, params: Mapping[str, Any], tags: Mapping[str, Any]) -> str | None:
        """Weights kept while the run trains: a READY model record of their own at `step` (tagged KEPT_TAG)
        holding the checkpoint `folder`; its id, or None where the store keeps no model records."""

    def kept_models(self) -> dict[int, str]:
        """The models `keep_model` made for this run, an earlier process's included: model id by step."""

    def drop_model(self, model_id: str) -> None:
        """A kept model gone: its files deleted, its record too."""

    def start_system_metrics(self, every_s: float) -> None: ...

    def stop_system_metrics(self) -> None: ...

    def end(self, error: BaseException | None = None) -> None:
        """FINISHED without an error, else the status `ended_as` gives, with its reason."""


@dataclass(frozen=True)
class FinishedRun:
    """A FINISHED run found by its identity (`RunLogs.latest_finished`): what `vaelab train` names instead
    of training the same run again."""

    run_id: str
    metrics: dict[str, float]  # each metric's last value
    artifact_uri: str


class RunLogs(Protocol):
    """Where runs' logs are opened: a tracking store, or memory."""

    uri: str  # what a run's system-metrics default reads (`runner.start.system_metrics_wanted`)

    @property
    def resume_root(self) -> Path: ...  # where runs keep their resumable training state

    def open_run(self, experiment: str, run_name: str, tags: Mapping[str, Any] | None = None) -> RunLog:
        """A RUNNING run; the caller ends it (`RunLog.end`)."""

    def reopen_run(self, run_id: str) -> RunLog | None:
        """A run that did not finish, RUNNING again; None if it finished or is gone."""

    def latest_finished(self, experiment: str, run_hash: str) -> FinishedRun | None:
        """The latest FINISHED run of `experiment` tagged `HASH_TAG` = `run_hash`, or None."""


def ended_as(error: BaseException | None) -> tuple[str, str] | None:
    """(status, reason) a run ends with: FINISHED; KILLED on Ctrl-C; else the error's `mlflow_status`
    (vaelab.errors: a pruned run is KILLED) or FAILED. None for LeaseLost: the run is another
    worker's now, and it marked the run itself."""
    if isinstance(error, LeaseLost):
        return None
    if error is None:
        return "FINISHED", ""
    if isinstance(error, KeyboardInterrupt):
        return "KILLED", str(error) or "interrupted (KeyboardInterrupt)"
    return getattr(error, "mlflow_status", "FAILED"), f"{type(error).__name__}: {error}".strip()


def local_path(uri: str) -> Path | None:
    """The folder behind a file: URI (or a plain path); None for anything remote."""
    parsed = urlparse(uri)
    return Path(unquote(parsed.path)) if parsed.scheme in ("", "file") else None


@dataclass
class MemoryModel:
    params: dict[str, Any]
    status: str = "PENDING"
    metrics: dict[str, float] = field(default_factory=dict)
    folder: Path | None = None
    tags: dict[str, str] = field(default_factory=dict)


class MemoryRunLog:
    """A run kept in dicts; its files (figures, checkpoint, per-epoch images) copied into `folder`."""

    def __init__(self, run_id: str, experiment: str, name: str, folder: Path, tags: Mapping[str, Any] | None = None):
        self.run_id, self.experiment, self.name = run_id, experiment, name
        self.folder = folder
        self.guard: Callable[[], None] = lambda: None
        self.status = "RUNNING"
        self.params: dict[str, str] = {}
        self.tags: dict[str, str] = {k: str(v) for k, v in (tags or {}).items()}
        self.metrics: dict[str, list[tuple[int, float]]] = {}  # key -> (step, value) in the order logged
        self.datasets: list[dict[str, Any]] = []
        self.images: dict[str, list[int]] = {}  # key -> steps
        self.models: dict[str, MemoryModel] = {}
        self.logged_through = 0

    @property
    def artifact_uri(self) -> str:
        return self.folder.resolve().as_uri()

    def latest(self) -> dict[str, float]:
        """Each metric's last value (what a store shows as the run's metrics)."""
        return {k: v[-1][1] for k, v in self.metrics.items()}

    def history(self, key: str) -> list[tuple[int, float]]:
        return list(self.metrics.get(key, []))

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.guard()
        self.params.update({k: "null" if v is None else str(v) for k, v in params.items()})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.guard()
        self.tags.update({k: str(v) for k, v in tags.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        self.guard()
        for key, value in metrics.items():
            self.metrics.setdefault(key, []).append((step, float(value)))

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        if epoch > self.logged_through:
            self.log_metrics(metrics, step=epoch)

    def log_datasets(self, records: list[dict[str, Any]]) -> None:
        self.guard()
        self.datasets.extend(dict(r) for r in records)

    def log_image(self, path: Path, key: str, step: int) -> None:
        self.guard()
        self.images.setdefault(key, []).append(step)
        (self.folder / "images").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, self.folder / "images" / f"{key}+step+{step}.png")

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        self.guard()
        shutil.copytree(folder, self.folder / (artifact_path or ""), dirs_exist_ok=True)

    def try_start_model(self, params: Mapping[str, Any]) -> str | None:
        self.guard()
        model_id = f"m-{uuid.uuid4().hex}"
        self.models[model_id] = MemoryModel({k: str(v) for k, v in params.items()})
        return model_id

    def log_model_metrics(self, model_id: str, metrics: Mapping[str, float], step: int) -> None:
        self.log_metrics(metrics, step)
        self.models[model_id].metrics.update({k: float(v) for k, v in metrics.items()})

    def finish_model(self, model_id: str, folder: Path | None, step: int) -> None:
        self.guard()
        model = self.models[model_id]
        model.status = "FAILED" if folder is None else "READY"
        if folder is not None:  # its files are the run's copy of them (the run logs its artifacts first)
            model.folder = self.folder / folder.name

    def keep_model(self, folder: Path, step: int, params: Mapping[str, Any], tags: Mapping[str, Any]) -> str | None:
        """Copied to `folder/kept/epoch-NNNN/` of the run: on disk, so a resumed run (another process) finds it."""
        self.guard()
        kept = self.folder / KEPT_DIR / kept_name(step)
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(folder, kept)
        self.models[kept.name] = MemoryModel({k: str(v) for k, v in params.items()}, "READY", folder=kept,
                                             tags={**{k: str(v) for k, v in tags.items()}, KEPT_TAG: str(step)})
        return kept.name

    def kept_models(self) -> dict[int, str]:
        root = self.folder / KEPT_DIR
        found = sorted(root.glob("epoch-*")) if root.is_dir() else []
        return {int(p.name.removeprefix("epoch-")): p.name for p in found if p.name.removeprefix("epoch-").isdigit()}

    def drop_model(self, model_id: str) -> None:
        self.guard()
        shutil.rmtree(self.folder / KEPT_DIR / model_id, ignore_errors=True)
        self.models.pop(model_id, None)

    def start_system_metrics(self, every_s: float) -> None:
        """Nothing: there is no store to sample the machine into."""

    def stop_system_metrics(self) -> None:
        """Nothing was started."""

    def end(self, error: BaseException | None = None) -> None:
        ended = ended_as(error)
        if ended is None:
            return
        self.guard()
        self.status, reason = ended
        if reason:
            self.tags[FAILURE_TAG] = reason[:5000]


class MemoryRuns:
    """Run logs in memory, each run's files under `root/<run id>/`, resume states under `root/resume/`.
    A run id it does not hold (a run of an earlier process, resumed from its saved state) is reopened
    as a new, empty log under that id: memory does not outlive a process, the training state does."""

    uri = "memory:"

    def __init__(self, root: Path):
        self.root = root
        self.runs: dict[str, MemoryRunLog] = {}

    @property
    def resume_root(self) -> Path:
        return self.root / "resume"

    def _log(self, run_id: str, experiment: str, name: str, tags: Mapping[str, Any] | None) -> MemoryRunLog:
        log = MemoryRunLog(run_id, experiment, name, self.root / run_id, tags)
        self.runs[run_id] = log
        return log

    def open_run(self, experiment: str, run_name: str, tags: Mapping[str, Any] | None = None) -> MemoryRunLog:
        return self._log(uuid.uuid4().hex, experiment, run_name, tags)

    def reopen_run(self, run_id: str) -> MemoryRunLog | None:
        log = self.runs.get(run_id)
        if log is None:
            return self._log(run_id, "", "", {}) if run_id.isalnum() else None
        if log.status == "FINISHED":
            return None
        log.status = "RUNNING"
        log.tags.pop(FAILURE_TAG, None)
        # An epoch's metrics go in one batch, so train/loss's last step is the last epoch logged.
        log.logged_through = max((step for step, _ in log.metrics.get("train/loss", [])), default=0)
        return log

    def latest_finished(self, experiment: str, run_hash: str) -> FinishedRun | None:
        """The last FINISHED run of `experiment` with `run_hash` this process logged (memory holds no others)."""
        done = [log for log in self.runs.values() if log.experiment == experiment and log.status == "FINISHED"
                and log.tags.get(HASH_TAG) == run_hash]
        return FinishedRun(done[-1].run_id, done[-1].latest(), done[-1].artifact_uri) if done else None

    def only(self) -> MemoryRunLog:
        """The one run logged (for tests)."""
        [log] = self.runs.values()
        return log
