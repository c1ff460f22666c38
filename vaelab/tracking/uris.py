"""Where a tracking store is: its URI (explicit, $MLFLOW_TRACKING_URI, or `runs/mlflow.db`), the
artifacts folder beside a SQLite store, and the URI as printed (no credentials)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_STORE_DIR = Path("runs")


def default_tracking_uri() -> str:
    return f"sqlite:///{(DEFAULT_STORE_DIR / 'mlflow.db').resolve()}"


def resolve_tracking_uri(explicit: str | None = None) -> str:
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a SQLite store; None for any other store."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def artifact_root(uri: str) -> Path | None:
    """For a SQLite store, artifacts live in `artifacts/` beside the database
    (a server or other store decides for itself)."""
    path = sqlite_path(uri)
    return None if path is None else path.parent / "artifacts"


def store_exists(uri: str) -> bool:
    """False only for a SQLite store whose file is not there, or empty (reading must not create it: opening
    an empty file would write MLflow's schema into it)."""
    path = sqlite_path(uri)
    return path is None or (path.is_file() and path.stat().st_size > 0)


def without_credentials(uri: str) -> str:
    """`uri` with any user:password@ taken out, for what is printed or written to reports."""
    parts = urlparse(uri)
    if "@" not in parts.netloc:
        return uri
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()
