"""Checkpoints as MLflow models: each run's kept weights are a LoggedModel linked to the run and its test
metrics; a study's best run goes into the Model Registry; sample and reconstruct load `models:/` and
`runs:/` URIs. Loading stays weights-only: a planted pickle in a registered model is refused, not run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.conftest import REPO
from tests.test_sweep import make_sweep, write_spec


def vaelab(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "vaelab", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"


def swept(tmp_path: Path, mnist_root: Path) -> Path:
    path = write_spec(tmp_path, mnist_root, {"kind": "grid", "params": {"loss.beta": [0.5, 2.0]}, "seeds": [0]})
    sweep = make_sweep(tmp_path, path)
    parent = sweep.prepare()
    sweep.work(parent)
    sweep.finish(parent)
    return path


def test_each_run_is_a_logged_model_with_its_test_metrics(tmp_path: Path, mnist_root: Path):
    swept(tmp_path, mnist_root)
    client = MlflowClient(store(tmp_path), registry_uri=store(tmp_path))  # not the process-wide registry
    experiment = client.get_experiment_by_name("sweep_demo")
    children = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    for run in children:
        [model] = client.search_logged_models([experiment.experiment_id],
                                              filter_string=f"source_run_id = '{run.info.run_id}'")
        assert str(model.status).endswith("READY") and model.model_id == run.data.tags["vaelab.model_id"]
        linked = {m.key: m.value for m in model.metrics}
        assert linked["test/elbo"] == run.data.metrics["test/elbo"]
        files = {Path(a.path).name for a in client.list_logged_model_artifacts(model.model_id)}
        assert {"model.pt", "spec.yaml", "metrics.json"} <= files
        assert model.tags["vaelab.format"] == "checkpoint-v1"


def test_the_best_run_is_registered_and_sampled_from_its_models_uri(tmp_path: Path, mnist_root: Path):
    swept(tmp_path, mnist_root)
    done = vaelab(tmp_path, "register", "sweep_demo", "--by", "val/elbo")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("models:/sweep_demo/1")
    client = MlflowClient(store(tmp_path), registry_uri=store(tmp_path))  # not the process-wide registry
    version = client.get_model_version("sweep_demo", "1")
    experiment = client.get_experiment_by_name("sweep_demo")
    children = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert version.run_id == min(children, key=lambda r: r.data.metrics["best/val/elbo"]).info.run_id
    out = tmp_path / "s.png"
    sampled = vaelab(tmp_path, "sample", "models:/sweep_demo/1", "--n", "16", "--out", str(out))
    assert sampled.returncode == 0, sampled.stderr
    with Image.open(out) as image:
        assert image.size[0] > 28 * 4
    by_run = vaelab(tmp_path, "sample", f"runs:/{version.run_id}", "--n", "4", "--out", str(tmp_path / "r.png"))
    assert by_run.returncode == 0, by_run.stderr
    again = vaelab(tmp_path, "register", "sweep_demo")
    assert again.returncode == 0 and again.stdout.strip().endswith("models:/sweep_demo/2")
    # vaelab evaluate takes the registered model too, and writes into the run that made it.
    evaluated = vaelab(tmp_path, "evaluate", "models:/sweep_demo/1", "--set", "eval.iw_samples=5",
                       "--set", "eval.iw_images=8", "--no-progress")
    assert evaluated.returncode == 0, evaluated.stderr
    assert any(k.startswith("test/nll_iw_k5") for k in client.get_run(version.run_id).data.metrics)


def test_a_models_uri_that_does_not_exist_is_one_line(tmp_path: Path, mnist_root: Path):
    swept(tmp_path, mnist_root)
    done = vaelab(tmp_path, "sample", "models:/nothing/1", "--out", str(tmp_path / "x.png"))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("vaelab: error: models:/nothing/1: no such model")
    nothing = vaelab(tmp_path, "register", "sweep_demo", "--by", "test/elbo")
    assert nothing.returncode == 2 and "--by" in nothing.stderr  # never rank by test numbers


class Planted:
    """What a hostile model file would hold: unpickling it runs code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _register_folder(client: MlflowClient, name: str, folder: Path) -> None:
    """As another tool would: a LoggedModel holding `folder`, registered as version 1 of `name`."""
    import mlflow

    # Its artifacts beside the store, not in ./mlruns of wherever the tests run.
    location = (folder.parent / f"{name}-artifacts").as_uri()
    experiment = client.create_experiment(f"other-{name}", artifact_location=location)
    model = client.create_logged_model(experiment, name="x")
    client.log_model_artifacts(model.model_id, str(folder))
    client.finalize_logged_model(model.model_id, "READY")
    client.create_registered_model(name)
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(client.tracking_uri)  # the registry finds the model through the process's URI
    try:
        client.create_model_version(name, source=f"models:/{model.model_id}", model_id=model.model_id)
    finally:
        mlflow.set_tracking_uri(before)


def test_a_planted_pickle_in_a_registered_model_is_refused_not_run(tmp_path: Path, mnist_root: Path):
    swept(tmp_path, mnist_root)
    client = MlflowClient(store(tmp_path), registry_uri=store(tmp_path))  # not the process-wide registry
    good = Path(client.download_artifacts(client.search_runs(
        [client.get_experiment_by_name("sweep_demo").experiment_id])[0].info.run_id, "checkpoint", str(tmp_path)))
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "spec.yaml").write_text((good / "spec.yaml").read_text())
    marker = tmp_path / "pwned"
    torch.save({"weights": Planted(str(marker))}, evil / "model.pt")
    _register_folder(client, "evil", evil)
    done = vaelab(tmp_path, "sample", "models:/evil/1", "--out", str(tmp_path / "x.png"))
    assert done.returncode == 2 and "cannot load weights safely" in done.stderr
    assert not marker.exists()  # the pickle's code never ran
    # A model another tool registered (an MLflow pyfunc folder, say) is named as not vaelab's.
    other = tmp_path / "other"
    other.mkdir()
    (other / "MLmodel").write_text(yaml.safe_dump({"flavors": {"python_function": {}}}))
    _register_folder(client, "theirs", other)
    theirs = vaelab(tmp_path, "sample", "models:/theirs/1", "--out", str(tmp_path / "y.png"))
    assert theirs.returncode == 2 and "not a vaelab model" in theirs.stderr
