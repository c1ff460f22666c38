"""A trial's key figures as Optuna artifacts, so `vaelab dashboard` (optuna-dashboard) shows them on each
trial's page. The artifact store is a folder beside the study (studies/<name>/artifacts/): for a study in
a database that workers on several machines share, that folder must be on storage they share too (a
Slurm submit folder usually is); a worker that cannot write it says so in one line and the trial is told
as usual. The figures are read back from the tracking store, local or a server, so what the dashboard
shows is what MLflow holds."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.storages import BaseStorage
from optuna.trial import Trial

from vaelab.runner.outcome import FIGURES_DIR
from vaelab.sweeps.storage import STUDIES_DIR, study_dir
from vaelab.tracking import Tracker

# The figures a trial page shows, in this order (vaelab.runner.figures writes them).
TRIAL_FIGURES = ("samples.png", "reconstructions.png", "learning_curves.png")
ARTIFACTS_DIR = "artifacts"


def artifact_dir(study: str, root: Path = STUDIES_DIR) -> Path:
    return study_dir(study, root) / ARTIFACTS_DIR


def artifact_store(study: str, root: Path = STUDIES_DIR) -> FileSystemArtifactStore:
    folder = artifact_dir(study, root)
    folder.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(folder))


def attach_figures(tracker: Tracker, run_id: str, trial: Trial, storage: BaseStorage, folder: Path) -> int:
    """Upload the run's TRIAL_FIGURES to `trial` (still RUNNING: Optuna takes no attribute of a finished
    trial) in the artifact store at `folder`; how many were there. A run without figures (eval.figures:
    false) attaches none."""
    try:
        store = FileSystemArtifactStore(str(folder))
        folder.mkdir(parents=True, exist_ok=True)
        attached = 0
        with tempfile.TemporaryDirectory() as tmp:
            for name in TRIAL_FIGURES:
                path = tracker.fetch_artifact(run_id, f"{FIGURES_DIR}/{name}", Path(tmp))
                if path is None:
                    continue
                upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial, storage=storage,
                                mimetype="image/png")
                attached += 1
        return attached
    except OSError as err:  # the folder is not writable here: the trial's result matters more than its pictures
        warnings.warn(f"trial {trial.number}: its figures were not attached for the dashboard ({err})",
                      RuntimeWarning, stacklevel=2)
        return 0
