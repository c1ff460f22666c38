"""The shipped Slurm job-array script, submitted to a one-node Slurm cluster the test starts (munge,
slurmctld, slurmd from Debian's slurm-wlm, with a configuration of its own in a temporary folder): each
array task runs one `vaelab worker`, and together they finish the sweep, every point once. Root only
(`make test-cluster`); skipped without Slurm or PostgreSQL."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from optuna.trial import TrialState

from tests.conftest import REPO
from tests.test_sweep import GRID, child_runs, write_spec
from vaelab.spec import load_spec
from vaelab.sweeps.coordinator import Sweep
from vaelab.sweeps.queue import POINT
from vaelab.tracking import Tracker

pytestmark = pytest.mark.cluster
SCRIPT = REPO / "scripts" / "slurm" / "vaelab-workers.sbatch"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def slurm(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("a Slurm cluster of its own needs root")
    if not all(shutil.which(t) for t in ("slurmctld", "slurmd", "sbatch", "munged")):
        pytest.skip("no Slurm here (apt-get install slurm-wlm)")
    folder = tmp_path / "slurm"
    for sub in ("state", "spool", "log"):
        (folder / sub).mkdir(parents=True)
    host = socket.gethostname()
    conf = folder / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=vaelabtest", f"SlurmctldHost={host}", "SlurmUser=root",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
        f"StateSaveLocation={folder / 'state'}", f"SlurmdSpoolDir={folder / 'spool'}",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}", f"SlurmdPidFile={folder / 'slurmd.pid'}",
        f"SlurmctldLogFile={folder / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={folder / 'log' / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory", "MpiDefault=none", "ReturnToService=2",
        f"NodeName={host} CPUs={os.cpu_count()} RealMemory=16000 State=UNKNOWN",
        f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4", ""]))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    Path("/run/munge").mkdir(exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:  # no munged yet: start one
        subprocess.run(["runuser", "-u", "munge", "--", "munged", "--force"], check=True, capture_output=True)
    subprocess.run(["slurmctld"], env=env, check=True)
    subprocess.run(["slurmd"], env=env, check=True)
    try:
        deadline = time.time() + 60
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True,
                                           text=True).stdout:
            assert time.time() < deadline, (folder / "log" / "slurmctld.log").read_text()[-2000:]
            time.sleep(0.5)
        yield env
    finally:
        for pid_file in ("slurmd.pid", "slurmctld.pid"):
            pid = folder / pid_file
            if pid.is_file():
                try:
                    os.kill(int(pid.read_text().strip()), 15)
                except (ProcessLookupError, ValueError):
                    pass


def test_a_slurm_job_array_of_workers_finishes_the_sweep(slurm: dict, tmp_path: Path, mnist_root: Path,
                                                         postgres_url: str):
    spec = write_spec(tmp_path, mnist_root, GRID)
    (tmp_path / "logs").mkdir()
    env = {**slurm, "VAELAB_STORAGE": postgres_url, "VAELAB": str(REPO / ".venv" / "bin" / "vaelab"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}", "PYTHONPATH": str(REPO)}
    submitted = subprocess.run(["sbatch", "--parsable", "--wait", "--array=1-2", "--cpus-per-task=1", "--mem=2G",
                                str(SCRIPT), str(spec)], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=600)
    logs = {p.name: p.read_text() for p in (tmp_path / "logs").glob("*.out")}
    assert submitted.returncode == 0, (submitted.stderr, logs)
    assert len(logs) == 2 and all("ran" in text for text in logs.values()), logs  # two array tasks, two workers
    sweep = Sweep(load_spec(spec), postgres_url, Tracker(env["MLFLOW_TRACKING_URI"]), studies_root=tmp_path / "studies")
    complete = [t for t in sweep.trials() if t.state == TrialState.COMPLETE]
    assert Counter(t.user_attrs[POINT] for t in complete) == Counter({p.run.hash(): 1 for p in sweep.points})
    finished = [r for r in child_runs(tmp_path, sweep.spec.name)[0] if r.info.status == "FINISHED"]
    assert len(finished) == len(sweep.points)
