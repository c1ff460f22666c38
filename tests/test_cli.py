"""The command line as a user runs it: a subprocess in a fresh folder."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.conftest import REPO


def vaelab(cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "vaelab", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def write_spec(folder: Path, mnist_root: Path, **base) -> Path:
    spec = {"name": "cli_demo", "base": {
        "data": {"dataset": "mnist", "root": str(mnist_root), "download": False},
        "model": {"z_dim": 3, "hidden": [32]},
        "train": {"epochs": 2, "batch_size": 64, "device": "cpu"},
        "eval": {"tsne_points": 40, "iw_samples": 10}, **base}}
    (folder / "experiments").mkdir(exist_ok=True)
    path = folder / "experiments" / "cli_demo.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_train_then_sample(tmp_path: Path, mnist_root: Path):
    write_spec(tmp_path, mnist_root)
    done = vaelab(tmp_path, "train", "cli_demo", "--no-progress", "--set", "model.z_dim=2")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "runs" / "mlflow.db").is_file()
    checkpoint = next(line.split(": ", 1)[1] for line in done.stdout.splitlines() if line.startswith("checkpoint:"))
    assert Path(checkpoint).is_relative_to(tmp_path / "runs" / "artifacts")
    out = tmp_path / "grid.png"
    sampled = vaelab(tmp_path, "sample", checkpoint, "--n", "16", "--out", str(out))
    assert sampled.returncode == 0, sampled.stderr
    assert "z_dim=2" in sampled.stdout
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 4 * 28


def test_bad_spec_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, mnist_root: Path):
    write_spec(tmp_path, mnist_root, loss={"likelihood": "poisson"})
    done = vaelab(tmp_path, "train", "cli_demo")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "base.loss.likelihood" in done.stderr and "bernoulli" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_bad_override_and_unknown_spec(tmp_path: Path, mnist_root: Path):
    write_spec(tmp_path, mnist_root)
    bad = vaelab(tmp_path, "train", "cli_demo", "--set", "train.epochs=-1")
    assert bad.returncode == 2 and "--set train.epochs: expected int" in bad.stderr
    unknown = vaelab(tmp_path, "train", "nope")
    assert unknown.returncode == 2 and "known specs: cli_demo" in unknown.stderr
    assert not (tmp_path / "runs").exists()


def test_dry_run_prints_the_resolved_spec(tmp_path: Path, mnist_root: Path):
    write_spec(tmp_path, mnist_root)
    done = vaelab(tmp_path, "train", "cli_demo", "--dry-run", "--set", "loss.beta=4")
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert resolved["base"]["loss"]["beta"] == 4.0
    assert resolved["base"]["train"]["lr"] == 0.001  # defaults are filled in
    assert not (tmp_path / "runs").exists()


HEAVY = ("torch", "mlflow", "optuna", "pandas", "matplotlib")


def imported_modules(cwd: Path, *args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run the CLI under `python -X importtime` and return the modules it imported."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "vaelab", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    # "import time:   self [us] | cumulative | package.module" per import, on stderr
    modules = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines()
               if line.startswith("import time:") and line.count("|") == 2}
    return done, modules


@pytest.mark.parametrize("args", [("keys",), ("train", "cli_demo", "--dry-run"),
                                  ("train", "cli_demo", "--set", "model.z_dim=ten")])
def test_fast_commands_import_no_training_stack(tmp_path: Path, args: tuple[str, ...]):
    """`keys`, `train --dry-run` and a spec error answer before torch could load."""
    write_spec(tmp_path, tmp_path / "no_data")
    done, modules = imported_modules(tmp_path, *args)
    assert done.returncode == (2 if "--set" in args else 0), done.stderr[-2000:]
    assert "vaelab.spec" in modules  # the parse worked: the command really ran
    loaded = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert not loaded, f"{' '.join(args)} imported {loaded[:10]}"


def test_sample_bad_arguments(tmp_path: Path):
    done = vaelab(tmp_path, "sample", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png"))
    assert done.returncode == 2 and "not a checkpoint folder" in done.stderr
    done = vaelab(tmp_path, "sample", str(tmp_path), "--out", str(tmp_path / "x.jpg"))
    assert done.returncode == 2 and "--out" in done.stderr


def test_sweep_bad_search_and_no_search(tmp_path: Path, mnist_root: Path):
    write_spec(tmp_path, mnist_root)
    no_search = vaelab(tmp_path, "sweep", "cli_demo")
    assert no_search.returncode == 2 and "search: missing" in no_search.stderr
    spec = yaml.safe_load((tmp_path / "experiments" / "cli_demo.yaml").read_text())
    spec["search"] = {"kind": "grid", "params": {"loss.beta": [1, -2]}}
    (tmp_path / "experiments" / "cli_demo.yaml").write_text(yaml.safe_dump(spec))
    bad = vaelab(tmp_path, "sweep", "cli_demo")
    assert bad.returncode == 2
    assert bad.stderr.strip() == "vaelab: error: search.params.loss.beta[1]: expected float >= 0 and <= 1e+06, got -2"
    spec["search"] = {"kind": "grid", "params": {"loss.beta": [1, 2]}}
    (tmp_path / "experiments" / "cli_demo.yaml").write_text(yaml.safe_dump(spec))
    bad_storage = vaelab(tmp_path, "sweep", "cli_demo", "--storage", "redis://x")
    assert bad_storage.returncode == 2 and "--storage: expected an RDB URL" in bad_storage.stderr
    # Nothing listens on port 1: one line, and the password stays out of it.
    unreachable = vaelab(tmp_path, "sweep", "cli_demo", "--storage", "postgresql://alice:s3cret@127.0.0.1:1/optuna")
    assert unreachable.returncode == 2 and len(unreachable.stderr.strip().splitlines()) == 1, unreachable.stderr
    assert "cannot connect" in unreachable.stderr and "postgresql://127.0.0.1:1/optuna" in unreachable.stderr
    assert "s3cret" not in unreachable.stderr
    assert not (tmp_path / "studies").exists() and not (tmp_path / "runs").exists()


def test_sweep_dry_run_prints_the_table_and_a_cost(tmp_path: Path, mnist_root: Path):
    write_spec(tmp_path, mnist_root)
    spec = yaml.safe_load((tmp_path / "experiments" / "cli_demo.yaml").read_text())
    spec["search"] = {"kind": "grid", "params": {"loss.beta": [1, 4], "model.z_dim": [2, 8]}, "seeds": [0, 1, 2]}
    (tmp_path / "experiments" / "cli_demo.yaml").write_text(yaml.safe_dump(spec))
    done = vaelab(tmp_path, "sweep", "cli_demo", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "12 runs (4 points x 3 seeds)" in done.stdout
    assert "rough cost" in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.startswith("|") and "---" not in line]
    assert len(rows) == 1 + 12
    assert not (tmp_path / "studies").exists()


def test_report_of_a_study_with_no_runs_is_one_line(tmp_path: Path, mnist_root: Path):
    write_spec(tmp_path, mnist_root)
    done = vaelab(tmp_path, "report", "cli_demo")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"vaelab: error: no runs of 'cli_demo' in sqlite:///{tmp_path / 'runs' / 'mlflow.db'}; "
        "run `make sweep EXP=cli_demo` first"]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "studies").exists()


def test_an_untracked_run_never_imports_mlflow_and_its_checkpoint_reconstructs_any_image_size(
        tmp_path: Path, mnist_root: Path):
    write_spec(tmp_path, mnist_root, train={"epochs": 1, "batch_size": 64, "device": "cpu", "figure_every": 1})
    done, modules = imported_modules(tmp_path, "train", "cli_demo", "--no-progress", "--no-track")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "vaelab.runner" in modules and "torch" in modules  # it trained
    assert not [m for m in modules if m.split(".")[0] == "mlflow"]
    assert "not tracked" in done.stdout and "test/elbo" in done.stdout  # the results are printed
    checkpoint = next(line.split(": ", 1)[1] for line in done.stdout.splitlines() if line.startswith("checkpoint:"))
    assert Path(checkpoint).is_relative_to(tmp_path / "untracked" / "cli_demo")
    assert {p.name for p in Path(checkpoint).iterdir()} == {"model.pt", "spec.yaml", "metrics.json", "run.json"}
    assert (Path(checkpoint).parent / "figures" / "tsne.png").is_file()
    assert not (tmp_path / "runs").exists()  # no tracking store
    # train.figure_every: the epoch's pictures are kept as images with the epoch as their step.
    names = {p.name for p in (Path(checkpoint).parent / "images").iterdir()}
    assert names == {"reconstructions+step+1.png", "samples+step+1.png"}, names
    Image.new("RGB", (300, 170), (200, 30, 30)).save(tmp_path / "photo.jpg")
    out = tmp_path / "side_by_side.png"
    made = vaelab(tmp_path, "reconstruct", checkpoint, str(tmp_path / "photo.jpg"), "--out", str(out))
    assert made.returncode == 0, made.stderr
    with Image.open(out) as image:
        assert image.size == (2 * 28 + 3 * 2, 28 + 2 * 2)  # two 28x28 tiles with 2-pixel padding
    (tmp_path / "broken.png").write_bytes(b"not an image")
    bad = vaelab(tmp_path, "reconstruct", checkpoint, str(tmp_path / "broken.png"), "--out", str(out))
    assert bad.returncode == 2 and "cannot read as an image" in bad.stderr


def test_sigterm_marks_the_run_killed(tmp_path: Path, mnist_root: Path):
    import signal
    import sqlite3

    from mlflow.tracking import MlflowClient

    write_spec(tmp_path, mnist_root, train={"epochs": 500, "batch_size": 8, "device": "cpu", "patience": None})
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen([sys.executable, "-m", "vaelab", "train", "cli_demo", "--no-progress"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    db = tmp_path / "runs" / "mlflow.db"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the run exists and trains (short read-only peeks)
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as peek:
                if peek.execute("SELECT count(*) FROM runs WHERE status = 'RUNNING'").fetchone()[0]:
                    break
        except sqlite3.Error:
            pass  # not created (or not migrated) yet
        time.sleep(0.5)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "stopped by SIGTERM" in stderr and "resumes" in stderr
    client = MlflowClient(f"sqlite:///{db}")
    [record] = client.search_runs([client.get_experiment_by_name("cli_demo").experiment_id])
    assert record.info.status == "KILLED"
    assert record.data.tags["failure_reason"] == "stopped by SIGTERM"
