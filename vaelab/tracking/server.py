"""Talking to MLflow: its own output quietened once per command, a tracking server checked once
(reachable, TLS, credentials) before anything is recorded, and MLflow's errors read by what they
mean (a full disk, "not found" as opposed to "unreachable")."""

from __future__ import annotations

import errno
import logging
import os
import time

from vaelab.errors import TrackingError, causes
from vaelab.tracking.uris import without_credentials


def quiet_mlflow() -> None:
    """MLflow's own output, set once at the command's entry (before mlflow is imported):
    no schema-migration announcements for a new SQLite store, no artifact upload bars,
    and no "View run" line per run through vaelab's progress bars (vaelab prints the
    run's address itself: Store.run_url). A user's own settings win."""
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
