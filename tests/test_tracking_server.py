"""Workers on several machines log to one MLflow tracking server: a real `mlflow
server` on 127.0.0.1 with its own store and artifact folder, two `vaelab worker`
processes that reach it only over HTTP, then the report built from the server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import REPO

GRID = {"kind": "grid", "params": {"loss.beta": [0.5, 2.0]}, "seeds": [0, 1]}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """(URL, artifact folder) of an MLflow server that proxies artifacts, as a team would run one
    (one for this module: it takes ~20 s to start; the tests use experiments of their own)."""
    folder = tmp_path_factory.mktemp("server")
    url = f"http://127.0.0.1:{free_port()}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1],
         "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", str(folder / "artifacts")],
        cwd=folder, stdout=subprocess.DEVNULL, stderr=open(folder / "server.log", "w"), start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail("mlflow server did not start: " + (folder / "server.log").read_text()[-2000:])
                time.sleep(0.5)
        yield url, folder / "artifacts"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def vaelab(cwd: Path, tracking_uri: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": tracking_uri}
    return subprocess.Popen([sys.executable, "-m", "vaelab", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_two_workers_share_a_sweep_through_an_mlflow_server(tmp_path: Path, mnist_root: Path,
                                                            tracking_server: tuple[str, Path]):
    url, artifacts = tracking_server
    worker_dir = tmp_path / "worker"
    (worker_dir / "experiments").mkdir(parents=True)
    spec = {"name": "server_demo", "search": GRID, "base": {
        "data": {"dataset": "mnist", "root": str(mnist_root), "download": False},
        "model": {"z_dim": 3, "hidden": [32]},
        "train": {"epochs": 2, "batch_size": 64, "device": "cpu", "patience": None},
        "eval": {"iw_samples": 0, "probe": False, "tsne_points": 0},
    }}
    path = worker_dir / "experiments" / "server_demo.yaml"
    path.write_text(yaml.safe_dump(spec))

    workers = [vaelab(worker_dir, url, "worker", str(path)) for _ in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    # vaelab's own lines only: MLflow's per-run "View run" prints would run through the progress bars.
    assert not [line for o in outputs for line in o.splitlines() if "View run" in line]

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("server_demo")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "vaelab.sweep" in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1
    assert Counter(r.info.status for r in children) == Counter({"FINISHED": 4})
    assert len({r.data.tags["vaelab.run_hash"] for r in children}) == 4
    for run in children:
        # Figures and checkpoint went through the server into its artifact folder, not the worker's disk.
        listed = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
        assert "figures/reconstructions.png" in listed
        assert list(artifacts.rglob(f"{run.info.run_id}/artifacts/checkpoint/model.pt"))
        assert 0 < run.data.metrics["test/elbo"] < 1e4
    assert not (worker_dir / "runs" / "artifacts").exists()

    report = vaelab(worker_dir, url, "report", str(path))
    output = report.communicate(timeout=120)[0]
    assert report.returncode == 0, output
    text = (worker_dir / "studies" / "server_demo" / "report.md").read_text()
    # Run links open the server's own UI.
    table = text.split("## Best run")[0]
    assert table.count(f"]({url}/#/experiments/{experiment.experiment_id}/runs/") == 4
    assert f"]({url}/#/experiments/{experiment.experiment_id}/runs/" in text.split("## Best run")[1]
    assert (worker_dir / "studies" / "server_demo" / "figures" / "best_reconstructions.png").stat().st_size > 0


def test_train_against_a_server_prints_the_runs_address(tmp_path: Path, mnist_root: Path,
                                                        tracking_server: tuple[str, Path]):
    url, _ = tracking_server
    spec = {"name": "server_train", "base": {
        "data": {"dataset": "mnist", "root": str(mnist_root), "download": False},
        "model": {"z_dim": 3, "hidden": [32]},
        "train": {"epochs": 1, "batch_size": 64, "device": "cpu"},
        "eval": {"iw_samples": 0, "probe": False, "tsne_points": 0},
    }}
    path = tmp_path / "server_train.yaml"
    path.write_text(yaml.safe_dump(spec))
    done = vaelab(tmp_path, url, "train", str(path), "--no-progress")
    output = done.communicate(timeout=300)[0]
    assert done.returncode == 0, output
    [run] = MlflowClient(url).search_runs([MlflowClient(url).get_experiment_by_name("server_train").experiment_id])
    address = f"{url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning"
    assert [line.strip() for line in output.splitlines() if url + "/#" in line] == [address]


def test_printed_addresses_carry_no_credentials():
    from vaelab.errors import TrackingError
    from vaelab.tracking import Tracker, ui_base_for, without_credentials

    assert without_credentials("https://bob:pw@mlflow.example.org:8443/") == "https://mlflow.example.org:8443/"
    assert ui_base_for("https://bob:pw@mlflow.example.org:8443/") == "https://mlflow.example.org:8443"
    assert ui_base_for("sqlite:////data/runs/mlflow.db") == "http://127.0.0.1:5000"  # `make ui`
    # A Tracker checks its server once; the error that says it is not there names it without the password.
    with pytest.raises(TrackingError) as refused:
        Tracker("http://bob:pw@127.0.0.1:1")
    assert "http://127.0.0.1:1 is unreachable" in str(refused.value) and "pw" not in str(refused.value)
