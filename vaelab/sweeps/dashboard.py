"""`vaelab dashboard SPEC`: optuna-dashboard over a study's storage (its journal under studies/<name>/ or
its database URL), on 127.0.0.1 unless told otherwise.

The server runs as `python -m vaelab.sweeps.dashboard` in a process group of its own (vaelab.ops.serve),
and learns the storage from an environment variable, never from its command line: a database URL may
carry a password, and a command line is visible to every user of the machine."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import optuna

from vaelab.errors import UsageError
from vaelab.spec import Spec
from vaelab.sweeps.storage import STUDIES_DIR, open_storage, storage_url, study_dir
from vaelab.tracking import without_credentials

STORAGE_ENV = "VAELAB_DASHBOARD_STORAGE"
ARTIFACTS_ENV = "VAELAB_DASHBOARD_ARTIFACTS"  # the study's artifact folder: each trial's figures
JOURNAL_PREFIX = "journal:"


def dashboard_storage(spec: Spec, url: str | None, root: Path = STUDIES_DIR) -> str:
    """What the dashboard opens: the study's database URL, or `journal:<path>` of its journal file;
    UsageError if the study does not exist there (nothing is created)."""
    resolved = storage_url(spec, url)
    if resolved:
        where, storage = without_credentials(resolved), open_storage(spec, resolved, root)
        target = resolved
    else:
        journal = study_dir(spec.name, root) / "optuna.journal"
        if not journal.is_file():
            raise UsageError(f"no study '{spec.name}' yet (no {journal}); run `make sweep EXP={spec.name}` first, "
                             "or pass --storage for a study in a database")
        where, storage, target = str(journal), open_storage(spec, None, root), f"{JOURNAL_PREFIX}{journal}"
    if spec.name not in optuna.get_all_study_names(storage):
        raise UsageError(f"no study '{spec.name}' in {where}; run `make sweep EXP={spec.name}` first")
    return target


def dashboard_command() -> list[str]:
    return [sys.executable, "-m", "vaelab.sweeps.dashboard"]


def main() -> None:
    import optuna_dashboard
    from optuna.artifacts import FileSystemArtifactStore
    from optuna.storages import BaseStorage, JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    target = os.environ.pop(STORAGE_ENV)
    host, port = sys.argv[1], int(sys.argv[2])
    storage: BaseStorage
    if target.startswith(JOURNAL_PREFIX):
        path = target[len(JOURNAL_PREFIX):]
        storage = JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
    else:
        storage = optuna.storages.RDBStorage(target)
    artifacts = os.environ.pop(ARTIFACTS_ENV, "")
    store = FileSystemArtifactStore(artifacts) if artifacts and Path(artifacts).is_dir() else None
    optuna_dashboard.run_server(storage, host=host, port=port, artifact_store=store)


if __name__ == "__main__":
    main()
