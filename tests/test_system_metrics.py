"""System metrics: each run samples the machine (CPU, memory; GPU utilisation and memory through NVML where
there is a GPU) into system/* metrics while it runs, switched by train.system_metrics, and the sampler
stops with the run."""

from __future__ import annotations

import threading
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.conftest import tiny_run
from vaelab.runner import run, system_metrics_wanted
from vaelab.spec import with_values
from vaelab.tracking import Tracker


def test_a_run_samples_the_machine_and_stops_sampling_when_it_ends(mnist_root: Path, tracking_uri: str):
    spec = with_values(tiny_run(mnist_root), {"train.epochs": 3, "train.system_metrics": True,
                                              "train.system_metrics_s": 0.5, "eval.iw_samples": 0})
    outcome = run(spec, "system", Tracker(tracking_uri), show_progress=False)
    metrics = MlflowClient(tracking_uri).get_run(outcome.run_id).data.metrics
    assert 0.0 <= metrics["system/cpu_utilization_percentage"] <= 100.0 * 64
    assert metrics["system/system_memory_usage_megabytes"] > 0
    assert not [t for t in threading.enumerate() if "SystemMetricsMonitor" in t.name]  # stopped with the run
    # Where the images live and how the machine is watched do not change what the run is.
    assert with_values(spec, {"train.system_metrics": False}).hash() == spec.hash()


def test_system_metrics_are_on_by_default_with_a_tracking_server_only():
    assert system_metrics_wanted("auto", "http://10.0.0.1:5000")
    assert system_metrics_wanted("auto", "https://mlflow.lab.example")
    assert not system_metrics_wanted("auto", "sqlite:///runs/mlflow.db")
    assert system_metrics_wanted(True, "sqlite:///runs/mlflow.db")
    assert not system_metrics_wanted(False, "http://10.0.0.1:5000")


def test_system_metrics_off_logs_none(mnist_root: Path, tracking_uri: str):
    # Auto, with a local SQLite store: several processes writing one file do not also get a sampler thread each.
    assert tiny_run(mnist_root).train.system_metrics == "auto"
    spec = with_values(tiny_run(mnist_root), {"train.system_metrics_s": 0.5, "eval.iw_samples": 0})
    outcome = run(spec, "system_off", Tracker(tracking_uri), show_progress=False)
    metrics = MlflowClient(tracking_uri).get_run(outcome.run_id).data.metrics
    assert not [k for k in metrics if k.startswith("system/")]
