"""A store that cannot be written (a file where runs/ should be) and a disk that
fills up mid-run: one line, a non-zero exit, and nothing recorded is lost."""

from __future__ import annotations

import os
import resource
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import REPO


def write_spec(folder: Path, mnist_root: Path, hidden: int = 32) -> Path:
    spec = {"name": "faults", "base": {
        "data": {"dataset": "mnist", "root": str(mnist_root), "download": False},
        "model": {"z_dim": 3, "hidden": [hidden]},
        "train": {"epochs": 2, "batch_size": 64, "device": "cpu"},
        "eval": {"figures": False, "iw_samples": 0, "probe": False},
    }}
    path = folder / "faults.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def vaelab(cwd: Path, *args: str, file_limit: int | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO)

    def limit_files():
        # Files may not grow past `file_limit` bytes: writes fail with EFBIG, as on a full disk.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    return subprocess.run([sys.executable, "-m", "vaelab", *args, "--no-progress"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=limit_files if file_limit else None)


def test_unwritable_runs_folder_is_one_line(tmp_path: Path, mnist_root: Path):
    spec = write_spec(tmp_path, mnist_root)
    (tmp_path / "runs").write_text("not a folder")
    done = vaelab(tmp_path, "train", str(spec))
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "runs" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "runs").read_text() == "not a folder"


def test_running_out_of_space_mid_run_fails_cleanly_and_keeps_the_store(tmp_path: Path, mnist_root: Path):
    spec = write_spec(tmp_path, mnist_root, hidden=32)
    first = vaelab(tmp_path, "train", str(spec))  # a finished run that must survive what follows
    assert first.returncode == 0, first.stderr
    # A bigger model: its resume state (weights, Adam moments, best weights) outgrows the limit.
    big = write_spec(tmp_path, mnist_root, hidden=1024)
    db = tmp_path / "runs" / "mlflow.db"
    done = vaelab(tmp_path, "train", str(big), file_limit=db.stat().st_size + 4 * 2**20)
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1 and "cannot write" in done.stderr and "intact" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]
    failed = next(r for r in runs if r.info.status == "FAILED")
    assert "File too large" in failed.data.tags["failure_reason"]
    # With room again, the same command runs from the start and finishes.
    again = vaelab(tmp_path, "train", str(big))
    assert again.returncode == 0, again.stderr
