"""Sweeps on Slurm. The cluster tests (`make test-cluster`, root; skipped without Slurm or PostgreSQL)
start a one-node Slurm cluster of their own (munge, slurmctld, slurmd from Debian's slurm-wlm, with a
configuration in a temporary folder) and submit to it: the shipped job-array script; `vaelab sweep
--slurm` end to end with `vaelab status`; a task preempted mid-epoch (`scontrol requeue`); a task past
its time limit (Slurm's USR1 warning, the task requeueing itself). Each ends with every point FINISHED
once, every per-epoch metric logged once, and a log of plain lines, one per epoch.

The other tests need no Slurm: the script `--dry-run` prints, the refusals of its flags, and a worker
that gets the warning signal inside a (stated) Slurm task, with a stand-in `scontrol` that records the
requeue."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tests.conftest import REPO, make_idx_folder
from tests.test_sweep import GRID, assert_each_point_once, child_runs, make_sweep, write_spec
from vaelab.spec import load_spec
from vaelab.sweeps.coordinator import Sweep
from vaelab.sweeps.queue import DIED, MLFLOW_RUN, POINT, RETRY_OF
from vaelab.tracking import Tracker

SCRIPT = REPO / "scripts" / "slurm" / "vaelab-workers.sbatch"
EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+)\b", re.M)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("a Slurm cluster of its own needs root")
    if not all(shutil.which(t) for t in ("slurmctld", "slurmd", "sbatch", "munged")):
        pytest.skip("no Slurm here (apt-get install slurm-wlm)")
    folder = tmp_path_factory.mktemp("slurm")
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
        # A requeued task waits cred_expire (120 s by default) before it may start again; 10 s here (about
        # 30 s in all, measured) keeps the requeue tests short.
        "AuthInfo=cred_expire=10",
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


def _env(slurm: dict, tmp_path: Path, postgres_url: str) -> dict:
    return {**slurm, "VAELAB_STORAGE": postgres_url, "PYTHONPATH": str(REPO),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"}


def _vaelab(env: dict, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vaelab", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _submit(env: dict, cwd: Path, spec: Path, *flags: str) -> str:
    done = _vaelab(env, cwd, "sweep", str(spec), "--slurm", "--mem", "1G", *flags)
    assert done.returncode == 0, done.stderr
    job = done.stdout.splitlines()[0]
    assert job.isdigit() and f"Slurm job array {job}" in done.stdout, done.stdout  # the job id, printed first
    return job


def _logs(cwd: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((cwd / "studies").glob("*/slurm/logs/*.out"))}


def _wait_for(what: str, ready, cwd: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert time.time() < deadline, f"no {what} in {timeout:.0f} s: {_logs(cwd)}"
        time.sleep(0.3)


def _gone(env: dict, job: str):
    return lambda: not subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True,
                                      text=True).stdout.strip()


def _assert_each_epoch_once(tmp_path: Path, name: str, epochs: int) -> None:
    """Every FINISHED child run holds each per-epoch metric at steps 1..epochs, each once."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    for run in child_runs(tmp_path, name)[0]:
        for key in ("train/loss", "val/loss", "time/epoch_s"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert sorted(steps) == list(range(1, epochs + 1)), (run.info.run_id, key, steps)


def _assert_plain_log(text: str) -> list[int]:
    """A Slurm log of plain lines: no carriage return; returns the epochs it names, in order."""
    assert "\r" not in text
    return [int(n) for n, _ in EPOCH_LINE.findall(text)]


@pytest.mark.cluster
def test_a_slurm_job_array_of_workers_finishes_the_sweep(slurm: dict, tmp_path: Path, mnist_root: Path,
                                                         postgres_url: str):
    spec = write_spec(tmp_path, mnist_root, GRID)
    (tmp_path / "logs").mkdir()
    env = {**_env(slurm, tmp_path, postgres_url), "VAELAB": str(REPO / ".venv" / "bin" / "vaelab")}
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


@pytest.mark.cluster
def test_vaelab_sweep_slurm_submits_the_array_and_status_shows_points_beside_tasks(
        slurm: dict, tmp_path: Path, mnist_root: Path, postgres_url: str):
    spec = write_spec(tmp_path, mnist_root, GRID)  # 4 points, 2 epochs each
    env = _env(slurm, tmp_path, postgres_url)
    job = _submit(env, tmp_path, spec, "--tasks", "2", "--parallel", "2")
    status = _vaelab(env, tmp_path, "status", str(spec))
    assert status.returncode == 0, status.stderr
    assert re.search(r"study 'sweep_demo' \(.*\): \d+ complete", status.stdout), status.stdout
    assert f"Slurm job array {job} (tasks 0-1%2" in status.stdout
    assert re.search(rf"squeue: [12] task\(s\) pending or running\n  {job}_[01] ", status.stdout), status.stdout

    _wait_for("end of the job array", _gone(env, job), tmp_path, 300)
    sweep = make_sweep(tmp_path, spec, postgres_url)
    assert_each_point_once(sweep, tmp_path)
    _assert_each_epoch_once(tmp_path, "sweep_demo", 2)
    logs = _logs(tmp_path)
    assert sorted(logs) == [f"vaelab-sweep_demo-{job}_0.out", f"vaelab-sweep_demo-{job}_1.out"]
    epochs = [_assert_plain_log(text) for text in logs.values()]
    assert sorted(e for es in epochs for e in es) == [1, 1, 1, 1, 2, 2, 2, 2]  # one line per epoch of 4 runs
    assert sum(len(re.findall(r"^trial +\d+ complete ", text, re.M)) for text in logs.values()) == 4

    status = _vaelab(env, tmp_path, "status", str(spec))
    assert "COMPLETE  4" in status.stdout and "RUNNING   0" in status.stdout, status.stdout
    # This cluster keeps no accounting: squeue alone, and said so.
    assert "squeue: 0 task(s)" in status.stdout and "accounting storage is disabled" in status.stdout


def _slow_spec(tmp_path: Path, epochs: int, **search) -> Path:
    """Two points on 6000 training images, so an epoch takes a noticeable fraction of a second."""
    root = make_idx_folder(tmp_path / "mnist-large", n_train=6000, n_test=200)
    grid = {"kind": "grid", "params": {"loss.beta": [0.5, 2.0]}, "seeds": [0], **search}
    return write_spec(tmp_path, root, grid, train={"epochs": epochs, "batch_size": 64, "device": "cpu",
                                                   "patience": None})


def _retries(sweep: Sweep) -> list[tuple]:
    """(given-back trial, its retry) pairs."""
    trials = {t.number: t for t in sweep.trials()}
    return [(trials[t.user_attrs[RETRY_OF]], t) for t in trials.values() if RETRY_OF in t.user_attrs]


@pytest.mark.cluster
def test_a_task_preempted_mid_epoch_is_requeued_and_resumes_its_run(slurm: dict, tmp_path: Path,
                                                                      postgres_url: str):
    epochs = 50  # a trial trains for several seconds: the TERM lands while it trains
    spec = _slow_spec(tmp_path, epochs)
    env = _env(slurm, tmp_path, postgres_url)
    job = _submit(env, tmp_path, spec, "--tasks", "1")
    log = tmp_path / "studies" / "sweep_demo" / "slurm" / "logs" / f"vaelab-sweep_demo-{job}_0.out"
    _wait_for("third epoch", lambda: log.is_file() and "\nepoch 3/" in log.read_text(), tmp_path, 180)
    signalled = time.time()
    requeue = subprocess.run(["scontrol", "requeue", f"{job}_0"], env=env, capture_output=True, text=True)
    assert requeue.returncode == 0, requeue.stderr  # Slurm sends TERM, requeues the task, starts it again
    _wait_for("end of the job", _gone(env, job), tmp_path, 300)

    sweep = make_sweep(tmp_path, spec, postgres_url)
    assert_each_point_once(sweep, tmp_path)
    _assert_each_epoch_once(tmp_path, "sweep_demo", epochs)
    ((stopped, retry),) = _retries(sweep)
    assert "stopped by TERM" in stopped.user_attrs[DIED]
    children = child_runs(tmp_path, "sweep_demo")[0]
    assert len(children) == 2  # the stopped run went on in the same MLflow run
    resumed = next(r for r in children if r.info.run_id == stopped.user_attrs[MLFLOW_RUN])
    assert resumed.info.run_id == retry.user_attrs[MLFLOW_RUN]
    after = int(resumed.data.tags["vaelab.resumed_from_epoch"])
    assert 2 <= after < epochs  # resumed after the last epoch saved: lost at most the epoch under way
    text = log.read_text()
    assert "DUE TO JOB REQUEUE" in text and re.search(r"TERM: stopping (now|once this epoch's results)", text)
    # Two runs over two lives: the first up to where TERM stopped it (the epoch under way may have been
    # said but not saved, and is trained again), then on from its last saved epoch, then the second run.
    said = _assert_plain_log(text)
    assert said in ([*range(1, stop + 1), *range(after + 1, epochs + 1), *range(1, epochs + 1)]
                    for stop in (after, after + 1)), said
    back = stopped.datetime_complete.timestamp() - signalled
    again = retry.datetime_start.timestamp() - signalled
    print(f"\npreemption (scontrol requeue) cost: point handed back {back:.1f} s after the signal, its run "
          f"training again {again:.1f} s after it (Slurm's requeue wait and the worker's start included); "
          f"resumed after epoch {after}")


@pytest.mark.cluster
def test_a_task_past_its_time_limit_is_warned_requeues_itself_and_resumes_its_stack(slurm: dict, tmp_path: Path,
                                                                                     postgres_url: str):
    """A 1-minute task with Slurm's warning 20 s before the limit (Slurm sends it on a 30 s period: 10 to
    40 s into the task). The stack of two trains for longer than that, so the warning stops it after an
    epoch and the task requeues itself; its next life is given a longer limit, only to keep the test short."""
    epochs = 260  # about 95 s of training on two busy cores, and well over 40 s on a fast one
    spec = _slow_spec(tmp_path, epochs, stack=2)
    env = _env(slurm, tmp_path, postgres_url)
    job = _submit(env, tmp_path, spec, "--tasks", "1", "--time", "1", "--warn-s", "20")
    log = tmp_path / "studies" / "sweep_demo" / "slurm" / "logs" / f"vaelab-sweep_demo-{job}_0.out"
    _wait_for("requeue", lambda: log.is_file() and "requeued (scontrol requeue)" in log.read_text(), tmp_path, 150)
    update = subprocess.run(["scontrol", "update", f"JobId={job}_0", "TimeLimit=10"], env=env, capture_output=True,
                            text=True)
    assert update.returncode == 0, update.stderr
    _wait_for("end of the job", _gone(env, job), tmp_path, 300)

    sweep = make_sweep(tmp_path, spec, postgres_url)
    assert_each_point_once(sweep, tmp_path)
    _assert_each_epoch_once(tmp_path, "sweep_demo", epochs)
    # What always holds, wherever the warning lands (a loaded machine may start the worker late, and Slurm
    # may warn early): the task was requeued, each point FINISHED once, each epoch's metrics logged once.
    children = child_runs(tmp_path, "sweep_demo")[0]
    assert len(children) == 2 and {r.data.tags["vaelab.stacked"] for r in children} == {"2"}
    text = log.read_text()
    assert "the time limit is near (USR1)" in text
    assert _assert_plain_log(text) == list(range(1, epochs + 1))  # a stack: one line per epoch, over both lives
    retries = _retries(sweep)
    warned = re.search(r"vaelab: (\d\d:\d\d:\d\d) Slurm task \S+: the time limit is near", text)
    if not retries:  # warned before it claimed the stack: nothing to hand back, the next life ran it all
        assert "claiming no new trial" in text and not any("vaelab.resumed_from_epoch" in r.data.tags
                                                           for r in children)
        print(f"\ntime limit: warned at {warned[1] if warned else '?'}, before the stack was claimed")
        return
    # Warned while the stack trained: both members stopped after the same epoch and resumed from it.
    assert len(retries) == 2 and all("time limit near (USR1)" in old.user_attrs[DIED] for old, _ in retries)
    assert len({r.data.tags["vaelab.resumed_from_epoch"] for r in children}) == 1  # the stack stopped as one
    (old, retry), _ = sorted(retries, key=lambda pair: pair[1].datetime_start)
    print(f"\ntime limit: warned at {warned[1] if warned else '?'}, stack handed back at "
          f"{old.datetime_complete:%H:%M:%S}, training again "
          f"{(retry.datetime_start - old.datetime_complete).total_seconds():.1f} s later (Slurm's requeue wait and "
          f"the worker's start), after epoch {children[0].data.tags['vaelab.resumed_from_epoch']} of {epochs}")


# ---- without Slurm ---------------------------------------------------------------------------------------


def test_the_job_script_asks_for_an_array_a_warning_and_requeue_and_holds_no_password(
        tmp_path: Path, mnist_root: Path, sweep_cli, monkeypatch: pytest.MonkeyPatch):
    spec = write_spec(tmp_path, mnist_root, GRID)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "pgpass"))
    monkeypatch.setenv("VAELAB_STORAGE", "postgresql://vaelab@10.0.0.5:5432/optuna")
    code, out, err = sweep_cli("sweep", str(spec), "--slurm", "--dry-run", "--tasks", "8", "--parallel", "3",
                               "--time", "2:00:00", "--gpus-per-task", "1", "--set", "train.epochs=1")
    assert code == 0, err
    lines = out.splitlines()
    for directive in ("--array=0-7%3", "--requeue", "--signal=B:USR1@180", "--time=2:00:00", "--gpus-per-task=1",
                      "--open-mode=append", "--ntasks=1"):
        assert f"#SBATCH {directive}" in lines
    assert f"export PGPASSFILE={tmp_path / 'pgpass'}" in lines  # the password file by path
    assert "export VAELAB_STORAGE=postgresql://vaelab@10.0.0.5:5432/optuna" in lines
    (worker,) = [line for line in lines if line.startswith("exec ")]
    assert f" -m vaelab worker {spec} --set train.epochs=1 " in worker
    assert any(line.startswith("trap '' USR1") for line in lines)  # an early warning does not end the task
    assert not (tmp_path / "studies").exists()  # a dry run touches nothing
    code, out, _ = sweep_cli("sweep", str(spec), "--slurm", "--dry-run")  # one task per point by default
    assert code == 0 and "#SBATCH --array=0-3" in out.splitlines()


@pytest.mark.parametrize(("flags", "says"), [
    (("--storage", "postgresql://vaelab:s3cret@db/optuna"), "--storage: the URL holds a password"),
    (("--tracking-uri", "http://admin:s3cret@mlflow:5000"), "--tracking-uri: the URL holds a password"),
    (("--time", "1", "--warn-s", "60"), "--warn-s 60 must be below --time (60 s)"),
    (("--time", "soon"), "--time: expected a Slurm time"),
    (("--storage", "postgresql://vaelab@db/optuna?sslmode=require&PassWord=s3cret"),
     "--storage: the URL holds a password"),
    (("--tasks", "0"), "--tasks: expected an int in [1, 100000], got 0"),
    (("--parallel", "0"), "--parallel: expected an int in [1, 100000], got 0"),
    (("--heartbeat-s", "20", "--grace-s", "30"), "--heartbeat-s 20 must be positive and at most a third"),
    (("--workers", "2",), "--workers: a Slurm sweep's workers are its array tasks"),
])
def test_bad_slurm_flags_are_one_line_and_no_password_is_echoed(tmp_path: Path, mnist_root: Path, capsys,
                                                                  monkeypatch: pytest.MonkeyPatch, flags: tuple,
                                                                  says: str):
    from vaelab import cli

    spec = write_spec(tmp_path, mnist_root, GRID)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VAELAB_STORAGE", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    for dry in ((), ("--dry-run",)):
        code = cli.main(["sweep", str(spec), "--slurm", *dry, *flags])
        out, err = capsys.readouterr()
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
        assert "s3cret" not in out + err
    assert not (tmp_path / "studies").exists() and not (tmp_path / "runs").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="signals and a stand-in scontrol on PATH")
def test_a_warned_worker_hands_its_trial_back_after_the_epoch_and_requeues_its_task(tmp_path: Path):
    """USR1 inside a Slurm task (its variables set by hand; `scontrol` a stand-in that records its
    arguments): the trial stops after the epoch under way, its run KILLED with its state saved, its
    point back in the queue; the worker asks to requeue its task and exits 0; a next worker resumes the
    same run, each epoch logged once."""
    epochs = 20
    spec = _slow_spec(tmp_path, epochs)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.calls"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "VAELAB_STORAGE"))}
    env.update({"PYTHONPATH": str(REPO), "PATH": f"{bin_dir}:{env['PATH']}", "PYTHONUNBUFFERED": "1",
                "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"})
    task = {"SLURM_JOB_ID": "78", "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3", "VAELAB_SLURM_TASK": "1"}
    out = tmp_path / "worker.log"
    with open(out, "w") as sink:
        worker = subprocess.Popen([sys.executable, "-m", "vaelab", "worker", str(spec), "--threads", "1"],
                                  cwd=tmp_path, env={**env, **task}, stdout=sink, stderr=subprocess.STDOUT)
    try:
        _wait_for("second epoch", lambda: "\nepoch 2/" in out.read_text(), tmp_path, 120)
        worker.send_signal(signal.SIGUSR1)
        assert worker.wait(timeout=120) == 0, out.read_text()
    finally:
        worker.kill()
    text = out.read_text()
    assert (tmp_path / "scontrol.calls").read_text() == "requeue 77_3\n", text
    assert "the time limit is near (USR1): finishing this epoch" in text
    stopped_after = _assert_plain_log(text)[-1]
    assert 2 <= stopped_after < epochs

    sweep = make_sweep(tmp_path, spec)
    ((given_back, retry),) = _retries(sweep)
    assert given_back.user_attrs[DIED] == "Slurm task 77_3: time limit near (USR1)"
    assert retry.state == TrialState.WAITING
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert client.get_run(given_back.user_attrs[MLFLOW_RUN]).info.status == "KILLED"
    again = subprocess.run([sys.executable, "-m", "vaelab", "worker", str(spec), "--threads", "1"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"after epoch {stopped_after} of {epochs}" in again.stderr  # the same run, resumed where it stopped
    assert_each_point_once(sweep, tmp_path)
    _assert_each_epoch_once(tmp_path, "sweep_demo", epochs)
    assert len(child_runs(tmp_path, "sweep_demo")[0]) == 2


def test_parallel_without_tasks_is_capped_at_the_tasks(tmp_path: Path, mnist_root: Path, sweep_cli,
                                                       monkeypatch: pytest.MonkeyPatch):
    """--parallel 8 on a 4-point grid: 4 tasks, at most 4 at once (checked before the study exists, too);
    the script written for sbatch is its owner's alone (0600)."""
    from vaelab.sweeps import slurm

    spec = write_spec(tmp_path, mnist_root, GRID)
    monkeypatch.delenv("VAELAB_STORAGE", raising=False)
    code, out, err = sweep_cli("sweep", str(spec), "--slurm", "--dry-run", "--parallel", "8")
    assert code == 0, err
    assert "#SBATCH --array=0-3%4" in out.splitlines()
    assert "export VAELAB_SLURM_TASK=1  # the worker listens for Slurm's signals (vaelab.sweeps.slurm_task)" in out
    submitted: list[Path] = []
    monkeypatch.setattr(slurm, "submit", lambda script: submitted.append(script) or "4242")
    script = tmp_path / "studies" / "sweep_demo" / "slurm" / "sweep_demo.sbatch"
    script.parent.mkdir(parents=True)
    script.write_text("old")
    script.chmod(0o644)  # a script there before keeps no wider mode
    code, out, err = sweep_cli("sweep", str(spec), "--slurm", "--parallel", "8")
    assert code == 0, err
    assert submitted == [script] and out.splitlines()[0] == "4242"
    assert "#SBATCH --array=0-3%4" in script.read_text().splitlines()
    assert script.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("flags", [("--tasks", "2"), ("--parallel", "2"), ("--partition", "gpu"), ("--time", "10"),
                                   ("--gpus-per-task", "1"), ("--cpus-per-task", "2"), ("--mem", "1G"),
                                   ("--warn-s", "60")])
def test_slurm_flags_without_slurm_are_refused(tmp_path: Path, mnist_root: Path, sweep_cli, flags: tuple):
    spec = write_spec(tmp_path, mnist_root, GRID)
    code, _out, err = sweep_cli("sweep", str(spec), "--dry-run", *flags)
    assert code == 2 and f"{flags[0]}: only with --slurm" in err and len(err.strip().splitlines()) == 1, err


def test_a_submit_folder_with_whitespace_is_one_line(tmp_path: Path, mnist_root: Path, capsys,
                                                     monkeypatch: pytest.MonkeyPatch):
    from vaelab import cli

    spec = write_spec(tmp_path, mnist_root, GRID)
    folder = tmp_path / "my project"
    folder.mkdir()
    monkeypatch.chdir(folder)
    code = cli.main(["sweep", str(spec), "--slurm", "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 2 and "holds whitespace" in err and len(err.strip().splitlines()) == 1 and not out, err


def test_only_a_vaelab_job_script_makes_a_worker_a_slurm_task():
    from vaelab.sweeps.slurm_task import TaskStop, slurm_task

    plain = {"SLURM_JOB_ID": "78", "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3"}  # salloc, srun
    assert slurm_task(plain) is None and TaskStop.install(plain) is None
    assert slurm_task({**plain, "VAELAB_SLURM_TASK": "1"}) == "77_3"
    assert slurm_task({"SLURM_JOB_ID": "78", "VAELAB_SLURM_TASK": "1"}) == "78"


def test_a_signal_whose_line_cannot_be_written_does_not_crash_the_worker(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path):
    from vaelab.sweeps.slurm_task import TaskStop

    closed = open(tmp_path / "log", "w")  # noqa: SIM115
    closed_fd = closed.fileno()
    closed.close()

    class Gone:
        def fileno(self) -> int:
            return closed_fd  # os.write: EBADF

    monkeypatch.setattr(sys, "stderr", Gone())
    stop = TaskStop("77_3")
    stop.on_warning(signal.SIGUSR1, None)
    assert stop.asked() == "Slurm task 77_3: time limit near (USR1)" and stop.requeue


def test_term_while_training_stops_at_once():
    """Slurm KILLs soon after its TERM: a worker that waited for the epoch would be killed in it."""
    from vaelab.sweeps.slurm_task import TaskStop
    from vaelab.training.session import stop_requested, training_session

    stop = TaskStop("77_3")
    with training_session(), pytest.raises(KeyboardInterrupt, match="stopped by SIGTERM"):
        stop.on_term(signal.SIGTERM, sys._getframe())
    assert "stopped by TERM" in stop.asked() and not stop.requeue
    assert not stop_requested()


def _worker_args(spec: Path, tmp_path: Path):
    from vaelab.cli import build_parser

    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    return build_parser().parse_args(["worker", str(spec), "--tracking-uri", uri, "--quiet"])


def test_a_warning_during_the_last_trials_evaluation_still_finishes_the_sweep(
        tmp_path: Path, mnist_root: Path, monkeypatch: pytest.MonkeyPatch):
    """Nothing left to requeue: the warned worker closes the parent run (and evaluates) instead of returning."""
    from vaelab.sweeps import commands
    from vaelab.sweeps.slurm_task import TaskStop

    spec = write_spec(tmp_path, mnist_root, {"kind": "grid", "params": {"loss.beta": [1.0]}, "seeds": [0]})
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VAELAB_STORAGE", raising=False)
    sweep = make_sweep(tmp_path, spec)
    parent = sweep.prepare()
    assert sweep.work(parent) == 1  # every point done; the parent run still open

    class Warned(TaskStop):
        def requeue_task(self) -> bool:
            raise AssertionError("nothing is pending: no requeue")

    stop = Warned("77_3")
    stop.reason, stop.requeue = "Slurm task 77_3: time limit near (USR1)", True
    assert commands.run_worker(load_spec(spec), _worker_args(spec, tmp_path), stop) == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    assert client.get_run(parent).info.status == "FINISHED"


def test_a_stopped_trial_goes_back_only_once_its_run_is_let_go(tmp_path: Path, mnist_root: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
    """A warned trial is given back after run_group lets go of its run: a worker that claims the retry at
    once can resume it (no RunInProgress)."""
    from vaelab.resume import holding
    from vaelab.runner.start import resume_folder

    spec = write_spec(tmp_path, mnist_root, {"kind": "grid", "params": {"loss.beta": [1.0]}, "seeds": [0]},
                      train={"epochs": 3})
    monkeypatch.chdir(tmp_path)
    sweep = make_sweep(tmp_path, spec)
    parent = sweep.prepare()
    folder = resume_folder(sweep.tracker, sweep.spec.name, sweep.points[0].run.hash())
    free_when_given_back: list[bool] = []
    give_back = sweep.queue.give_back

    def spy(trial, reason: str) -> None:
        try:
            with holding(folder):
                free_when_given_back.append(True)
        except Exception:
            free_when_given_back.append(False)
        give_back(trial, reason)

    monkeypatch.setattr(sweep.queue, "give_back", spy)
    trial = sweep.queue.next_trial()
    with pytest.raises(KeyboardInterrupt):
        sweep.runner.run(trial, parent, stop=lambda: "Slurm task 77_3: time limit near (USR1)")
    assert free_when_given_back == [True]
    ((given_back, retry),) = _retries(sweep)
    assert given_back.user_attrs[DIED] == "Slurm task 77_3: time limit near (USR1)"


def _status(spec: Path, capsys, *flags: str) -> tuple[int, str, str]:
    from vaelab import cli

    code = cli.main(["status", str(spec), *flags])
    out, err = capsys.readouterr()
    return code, out, err


def test_status_creates_no_store_and_prints_no_control_characters(tmp_path: Path, mnist_root: Path, capsys,
                                                                  monkeypatch: pytest.MonkeyPatch):
    import json

    import optuna

    from vaelab.sweeps.queue import WORKER
    from vaelab.sweeps.slurm import JOB_ATTR

    spec = write_spec(tmp_path, mnist_root, GRID)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VAELAB_STORAGE", raising=False)
    db = tmp_path / "optuna.db"
    code, out, err = _status(spec, capsys, "--storage", f"sqlite:///{db}")
    assert code == 2 and "no study 'sweep_demo'" in err and len(err.strip().splitlines()) == 1, err
    assert not db.exists()  # asked, not created

    study = optuna.create_study(study_name="sweep_demo", storage=f"sqlite:///{db}")
    study.set_user_attr(JOB_ATTR + "7", json.dumps({"job": "7\x1b[2J", "array": "0-1", "time": None,
                                                    "script": "/x\n/y.sbatch", "submitted": "2025-01-01 00:00:00"}))
    running = study.ask()
    study._storage.set_trial_user_attr(running._trial_id, WORKER, "evil\x1b]0;pwned\x07host")
    code, out, err = _status(spec, capsys, "--storage", f"sqlite:///{db}")
    assert code == 0, err
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f]", out), out
    assert "Slurm job array 7?[2J" in out and "evil?]0;pwned?host" in out

    study.set_user_attr(JOB_ATTR + "8", "{not json")
    code, out, err = _status(spec, capsys, "--storage", f"sqlite:///{db}")
    assert code == 2 and "study attribute 'vaelab.slurm_job.8': not a Slurm job record" in err, err
    assert len(err.strip().splitlines()) == 1
