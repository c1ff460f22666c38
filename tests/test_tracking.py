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
    monkeypatch.setattr("vaelab.tracking.server.check_server", lambda uri: None)
    offline = Tracker(f"http://127.0.0.1:{port}")
    for ask in (offline.reopen_run, offline.run_exists):
        with pytest.raises(MlflowException, match="(?i)connect"):
            ask(run.run_id)


def test_a_server_that_is_not_what_was_asked_is_one_line_without_the_password():
    import http.server
    import threading

    plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    port = plain.server_address[1]
    try:
        with pytest.raises(TrackingError) as tls:  # https:// asked of a server that speaks plain HTTP
            Tracker(f"https://bob:s3cret@127.0.0.1:{port}")
        assert str(tls.value) == (f"MLflow server https://127.0.0.1:{port}: the TLS handshake failed "
                                  "(it speaks plain HTTP?)")
        with pytest.raises(TrackingError) as other:  # an HTTP server, not MLflow's
            Tracker(f"http://bob:s3cret@127.0.0.1:{port}")
        assert "is it an MLflow server?" in str(other.value) and "s3cret" not in str(other.value)
    finally:
        plain.shutdown()
