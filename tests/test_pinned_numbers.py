"""The same spec gives the same numbers: four runs through `vaelab train` / `vaelab sweep`
(the CLI, in this process, on a real MLflow store in tmp_path) against numbers pinned
before the reshaping of issue 24 (objectives, evaluators, data sources, run log).

The literals were produced by commit 5d26453 (5d264537d0b6fe8d64ec5ef03735ea2a29f24aaf) on CPU
with torch 2.14.1+cu130 (2 threads), on the fake MNIST files of `conftest.make_idx_folder`. A change of any of
them needs a reason (a deliberate change of what a spec means), stated where it is made;
a refactor must leave them alone. rel 1e-5: float32 sums re-ordered by another CPU or
library may move the last digits, a changed loss or seed moves the first ones."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, make_idx_folder

REL = 1e-5
TINY = {  # small enough that a run takes about a second on one CPU core
    "model": {"arch": "mlp", "z_dim": 4, "hidden": [32]},
    "train": {"epochs": 2, "batch_size": 64, "device": "cpu", "patience": None},
    "eval": {"figures": False, "iw_samples": 5, "tsne_points": 0, "probe": False},
}


def _data(root: Path) -> dict:
    return {"dataset": "mnist", "root": str(root), "download": False}


def _write(folder: Path, name: str, base: dict, search: dict | None = None) -> Path:
    body = {"name": name, "base": base, **({"search": search} if search else {})}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _runs(tmp_path: Path, experiment: str) -> tuple[MlflowClient, list]:
    """The runs of `experiment` in the store `sweep_cli` writes to."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r}"
    return client, client.search_runs([found.experiment_id])


def _last(client: MlflowClient, run_id: str, key: str) -> float:
    history = client.get_metric_history(run_id, key)
    assert history, f"{key} was never logged"
    return max(history, key=lambda m: (m.step, m.timestamp)).value


def _assert_pinned(actual: dict[str, float], pinned: dict[str, float]) -> None:
    """Every pinned number at once, so a failure shows all that moved (and what they are now)."""
    moved = {k: (v, actual.get(k)) for k, v in pinned.items()
             if actual.get(k) is None or actual[k] != pytest.approx(v, rel=REL)}
    assert not moved, "pinned -> now: " + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in moved.items())


BETA_STUDY_BASE = {
    "test/elbo": 458.28779296875,
    "test/recon": 457.177392578125,
    "test/kl": 1.110373306274414,
}


def test_beta_study_base_run(tmp_path: Path, mnist_root: Path, sweep_cli):
    # beta_study's own base (MLP 784-400-10, Bernoulli, beta 1, lr 1e-3, batch 128), as loaded by
    # vaelab, on the fake MNIST files and for 2 of its 20 epochs; figures off (they change no number).
    code, out, err = sweep_cli("train", str(REPO / "experiments" / "beta_study.yaml"), "--no-progress",
                               "--set", "data.dataset=mnist", "--set", f"data.root={mnist_root}",
                               "--set", "data.download=false", "--set", "train.epochs=2",
                               "--set", "eval.figures=false")
    assert code == 0, err
    client, [run] = _runs(tmp_path, "beta_study")
    assert run.data.params["model.hidden"] in ("[400]", "(400,)") and run.data.params["model.z_dim"] == "10"
    _assert_pinned(run.data.metrics, BETA_STUDY_BASE)


STACKED = {  # (loss.beta, train.seed) -> test/elbo
    ("0.5", "0"): 532.186865234375,
    ("0.5", "1"): 531.447998046875,
    ("2.0", "0"): 531.785595703125,
    ("2.0", "1"): 531.440234375,
}


def test_stacked_sweep(tmp_path: Path, mnist_root: Path, sweep_cli):
    grid = {"kind": "grid", "params": {"loss.beta": [0.5, 2.0]}, "seeds": [0, 1], "stack": 4}
    path = _write(tmp_path, "pin_stacked", {**TINY, "data": _data(mnist_root)}, grid)
    code, out, err = sweep_cli("sweep", str(path), "--no-progress")
    assert code == 0, err
    client, runs = _runs(tmp_path, "pin_stacked")
    members = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(members) == 4 and all(r.info.status == "FINISHED" for r in members)
    assert {r.data.tags.get("vaelab.stacked") for r in members} == {"4"}  # trained as one stack
    actual = {(r.data.params["loss.beta"], r.data.params["train.seed"]): r.data.metrics["test/elbo"]
              for r in members}
    assert set(actual) == set(STACKED)
    _assert_pinned({str(k): v for k, v in actual.items()}, {str(k): v for k, v in STACKED.items()})


FACTORVAE = {
    "test/elbo": 532.6103515625,
    "test/recon": 531.57939453125,
    "test/kl": 1.0309321403503418,
    "train/penalty": -0.6771179437637329,
    "train/discriminator_loss": 0.6983540058135986,
    "train/discriminator_acc": 0.5,
}


def test_factorvae_run(tmp_path: Path, mnist_root: Path, sweep_cli):
    loss = {"objective": "factorvae", "factor_gamma": 6.0, "beta": 1.0,
            "discriminator": {"layers": 2, "hidden": 32}}
    path = _write(tmp_path, "pin_factorvae", {**TINY, "data": _data(mnist_root), "loss": loss})
    code, out, err = sweep_cli("train", str(path), "--no-progress")
    assert code == 0, err
    client, [run] = _runs(tmp_path, "pin_factorvae")
    actual = {k: v for k, v in run.data.metrics.items() if k.startswith("test/")}
    for key in ("train/penalty", "train/discriminator_loss", "train/discriminator_acc"):
        actual[key] = _last(client, run.info.run_id, key)  # after the last epoch
    _assert_pinned(actual, FACTORVAE)


RESUMED_TEST_ELBO = 342.4228125


def _stop_in_first_epoch(done: threading.Event) -> None:
    """What a first Ctrl-C does (finish this epoch, then stop), asked as soon as training is under way."""
    from vaelab.training import request_stop

    while not done.is_set() and not request_stop():
        time.sleep(0.001)


def test_resumed_run_ends_with_the_uninterrupted_runs_numbers(tmp_path: Path, sweep_cli):
    # Enough images that the first epoch is still under way when the stop is asked for.
    base = {**TINY, "data": _data(make_idx_folder(tmp_path / "mnist", n_train=3000, n_test=200)),
            "train": {**TINY["train"], "epochs": 2, "batch_size": 32, "seed": 3}}
    reference = _write(tmp_path, "pin_reference", base)
    interrupted = _write(tmp_path, "pin_resumed", base)

    code, _, err = sweep_cli("train", str(reference), "--no-progress")
    assert code == 0, err

    done = threading.Event()
    stopper = threading.Thread(target=_stop_in_first_epoch, args=(done,), daemon=True)
    stopper.start()
    try:
        code, _, err = sweep_cli("train", str(interrupted), "--no-progress")
    finally:
        done.set()
        stopper.join()
    assert code == 130, err
    code, _, err = sweep_cli("train", str(interrupted), "--no-progress")  # the same command resumes it
    assert code == 0, err

    _, [expected] = _runs(tmp_path, "pin_reference")
    client, [resumed] = _runs(tmp_path, "pin_resumed")  # one run, carried on
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["vaelab.resumed_from_epoch"] == "1", "the stop came after the first epoch had ended"
    assert sorted(m.step for m in client.get_metric_history(resumed.info.run_id, "val/loss")) == [1, 2]
    for key in ("test/elbo", "test/recon", "test/kl", "test/nll_iw"):
        assert resumed.data.metrics[key] == pytest.approx(expected.data.metrics[key], rel=1e-6), key
    _assert_pinned({"test/elbo": resumed.data.metrics["test/elbo"]}, {"test/elbo": RESUMED_TEST_ELBO})
