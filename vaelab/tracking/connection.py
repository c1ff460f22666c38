"""One MLflow tracking store, opened once: the URI resolved, a server checked before anything is
recorded, a new SQLite store's schema made by one process at a time. `Store` (reads) and
`MlflowRuns` (writes) are built on it.

Only a write makes a SQLite store: opening one that is not there for reading is a one-line
TrackingError and leaves nothing behind (`vaelab sample runs:/...` in the wrong folder must not
leave an empty runs/mlflow.db there)."""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import Any

from vaelab.errors import TrackingError
from vaelab.tracking import server
from vaelab.tracking.uris import (
    DEFAULT_STORE_DIR,
    artifact_root,
    resolve_tracking_uri,
    sqlite_path,
    store_exists,
    without_credentials,
)


class Connection:
    """The store at `tracking_uri` (default: $MLFLOW_TRACKING_URI, else runs/mlflow.db) and its client.
    A SQLite store that is not there is made by the first write (`writable`); a read of it (`client`)
    is a TrackingError. `creates` False (`Store`, for commands that only read): refused at once."""

    creates = True

    def __init__(self, tracking_uri: str | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = resolve_tracking_uri(tracking_uri)
        root = artifact_root(self.uri)
        self.artifact_root = root
        self._client: Any = None
        if root is None:
            if self.uri.startswith(("http://", "https://")):
                server.check_server(self.uri)
            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        elif store_exists(self.uri):
            self._client = self._open()
        elif not self.creates:
            raise self.missing()

    def missing(self) -> TrackingError:
        return TrackingError(f"no tracking store at {sqlite_path(self.uri)}; runs are recorded where `vaelab train` "
                             "ran, or pass --tracking-uri")

    @property
    def exists(self) -> bool:
        """Whether the store is there (a server always is; a SQLite file once written)."""
        return self._client is not None or store_exists(self.uri)

    @property
    def client(self) -> Any:
        """The store's client, to read: a SQLite store that is not there is a TrackingError, never made."""
        if self._client is None:
            if not store_exists(self.uri):
                raise self.missing()
            self._client = self._open()
        return self._client

    @property
    def writable(self) -> Any:
        """The store's client, to write: a SQLite store that is not there yet is made (schema, artifacts)."""
        self.create()
        return self._client

    def create(self) -> None:
        """Make the store if it is not there (what a first write does)."""
        if self._client is None:
            self._client = self._open()

    def _open(self) -> Any:
        from mlflow.tracking import MlflowClient

        root = self.artifact_root
        assert root is not None
        try:
            root.mkdir(parents=True, exist_ok=True)
            # Opening a new SQLite store runs schema migrations; two workers doing it at
            # once corrupt each other, so they take turns.
            with open(root.parent / ".mlflow-init.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
                client.search_experiments(max_results=1)
            return client
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
