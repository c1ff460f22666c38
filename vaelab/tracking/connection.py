"""One MLflow tracking store, opened once: the URI resolved, a server checked before anything is
recorded, a new SQLite store's schema made by one process at a time. `Store` (reads) and
`MlflowRuns` (writes) are built on it."""

from __future__ import annotations

import fcntl
from pathlib import Path

from vaelab.errors import TrackingError
from vaelab.tracking import server
from vaelab.tracking.uris import DEFAULT_STORE_DIR, artifact_root, resolve_tracking_uri, without_credentials


class Connection:
    """The store at `tracking_uri` (default: $MLFLOW_TRACKING_URI, else runs/mlflow.db) and its client."""

    def __init__(self, tracking_uri: str | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = resolve_tracking_uri(tracking_uri)
        root = artifact_root(self.uri)
        self.artifact_root = root
        if root is None:
            if self.uri.startswith(("http://", "https://")):
                server.check_server(self.uri)
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
            problem = server.storage_problem(err) or str(err).strip().splitlines()[0][:200]
            raise TrackingError(f"tracking store {root.parent}/: {problem}") from None

    @property
    def shown_uri(self) -> str:
        """The store's URI as printed: without a user:password@ part."""
        return without_credentials(self.uri)

    @property
    def resume_root(self) -> Path:
        """Where runs keep their resumable training state: beside a SQLite store, else ./runs/resume."""
        return (self.artifact_root.parent if self.artifact_root else DEFAULT_STORE_DIR) / "resume"
