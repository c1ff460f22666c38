"""The tracking store tells "not found" apart from "cannot reach": a run is only
treated as gone when MLflow says so."""

from __future__ import annotations

import socket

import pytest
from mlflow.exceptions import MlflowException

from vaelab.errors import TrackingError
from vaelab.tracking import Tracker


def test_a_missing_run_is_gone_but_an_unreachable_server_is_an_error(tracking_uri: str, monkeypatch):
    tracker = Tracker(tracking_uri)
    assert tracker.reopen_run("0" * 32) is None
    assert tracker.run_exists("0" * 32) is False
    run = tracker.open_run("demo", "a-run")
    assert tracker.run_exists(run.run_id)

    with socket.socket() as probe:  # a port with nothing listening on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    # A worker is refused at once when the server is not there as it starts (one line, before anything is
    # recorded) ...
    with pytest.raises(TrackingError, match=r"MLflow server http://127.0.0.1:\d+ is unreachable \(connection ref"):
        Tracker(f"http://127.0.0.1:{port}")
    # ... and a server that goes away later is an error for what the worker asks, never "the run is gone".
    monkeypatch.setattr("vaelab.tracking.check_server", lambda uri: None)
    offline = Tracker(f"http://127.0.0.1:{port}")
    for ask in (offline.reopen_run, offline.run_exists):
        with pytest.raises(MlflowException, match="(?i)connect"):
            ask(run.run_id)
