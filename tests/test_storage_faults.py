"""A store that cannot be written (a file where runs/ should be), a disk that fills up mid-run, and a
database whose replies are lost after it committed: one line, a non-zero exit, and nothing recorded is lost;
no write counted twice."""

from __future__ import annotations

import os
import resource
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

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
    # The failure is one line, the last (the pre-flight and per-epoch lines a log gets come before it).
    said = done.stderr.splitlines()
    assert [line for line in said if line.startswith("vaelab:")] == said[-1:], done.stderr
    assert "cannot write" in said[-1] and "intact" in said[-1], done.stderr
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


class Proxy:
    """tests/cluster/faultproxy.py in front of the test database; `said` is its closing line."""

    def __init__(self, url: str, *faults: str):
        target = make_url(url)
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "cluster" / "faultproxy.py"),
                                      "--listen", "127.0.0.1:0", "--to", f"{target.host}:{target.port}",
                                      "--delay", "0", "--drop", "0", *faults],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        ready = self.proc.stdout.readline()  # "proxy ready on HOST:PORT"
        assert "proxy ready on" in ready, ready
        host, port = ready.split()[-1].rsplit(":", 1)
        self.url = target.set(host=host, port=int(port)).render_as_string(hide_password=False)
        self.said = ""

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        said = self.proc.communicate(timeout=30)[0].splitlines()
        self.said = next((line for line in said if line.startswith("proxy: ")), "\n".join(said))


@pytest.fixture
def lost_commit_replies(postgres_url: str) -> Iterator[Proxy]:
    """The test database, with the reply to 30 % of the COMMITs of transactions that wrote cut after the
    server committed."""
    proxy = Proxy(postgres_url, "--cut-reply", "0.3", "--cut-reply-to", "COMMIT", "--cut-reply-after", "INSERT",
                  "UPDATE", "--seed", "3")
    yield proxy
    if proxy.proc.poll() is None:
        proxy.stop()


def test_writes_whose_replies_were_lost_count_once(tmp_path: Path, mnist_root: Path, postgres_url: str,
                                                   lost_commit_replies: Proxy):
    """A claim, an enqueue or a tell that committed but whose reply never came is found by its receipt, not
    made again: two workers through such a network finish every point once, with no extra trial."""
    from tests.test_sweep import GRID, assert_each_point_once, make_sweep
    from tests.test_sweep import write_spec as write_sweep

    path = write_sweep(tmp_path, mnist_root, {**GRID, "params": {"loss.beta": [0.5, 1.0, 2.0]}},
                       train={"epochs": 1, "batch_size": 64, "device": "cpu", "patience": None})
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PYTHONPATH=str(REPO), VAELAB_STORAGE_RETRY_S="120")
    workers = [subprocess.Popen([sys.executable, "-m", "vaelab", "worker", str(path), "--storage",
                                 lost_commit_replies.url, "--heartbeat-s", "1", "--grace-s", "15"],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
               for _ in range(2)]
    try:
        outputs = [w.communicate(timeout=240)[0] for w in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
    lost_commit_replies.stop()
    assert [w.returncode for w in workers] == [0, 0], outputs
    assert int(lost_commit_replies.said.split(", ")[2].split()[0]) >= 5, lost_commit_replies.said
    sweep = make_sweep(tmp_path, path, storage=postgres_url)  # read directly, not through the proxy
    trials = sweep.trials()
    failures = [(t.number, t.user_attrs.get("failure_reason")) for t in trials if t.state != TrialState.COMPLETE]
    assert Counter(t.state for t in trials) == Counter({TrialState.COMPLETE: len(sweep.points)}), \
        (failures, [line for out in outputs for line in out.splitlines() if "fail" in line.lower()], outputs)
    assert_each_point_once(sweep, tmp_path)
