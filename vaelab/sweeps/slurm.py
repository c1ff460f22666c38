"""A sweep as a Slurm job array (`vaelab sweep SPEC --slurm`): Slurm schedules, vaelab only writes the
script and reads Slurm's answers.

The script (`job_script`) runs one `vaelab worker` per array task on the same spec and storage as every
other way of running a sweep, with the services' URLs and the path of a credentials file exported (a
password never enters the script or a command line: `check_no_password`). It asks Slurm for a warning
signal before the time limit (`--signal=B:USR1@WARN_S`, to the batch shell, which `exec` makes the
worker) and to requeue a preempted task (`--requeue`); what the worker does with them is
vaelab.sweeps.slurm_task's. The job id `sbatch --parsable` prints is recorded in the study
(`record_job`), so `vaelab status` can put the array's tasks (`squeue`, and `sacct` where the cluster
keeps accounting) beside the study's points.

Imports neither torch nor optuna: `--dry-run` prints the script at once."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlparse

from vaelab.errors import SweepError, UsageError

JOB_ATTR = "vaelab.slurm_job."  # study user attribute per submitted array: its record, as JSON
WARN_SIGNAL = "USR1"
DEFAULT_WARN_S = 180
_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")
_MEM = re.compile(r"\d+[KMGT]?")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


def time_limit_s(text: str) -> int | None:
    """Slurm's --time as seconds ("minutes", "minutes:seconds", "hours:minutes:seconds", "days-hours",
    "days-hours:minutes", "days-hours:minutes:seconds"); None for no limit."""
    if text.upper() in ("INFINITE", "UNLIMITED"):
        return None
    match = _TIME.fullmatch(text)
    if match is None:
        raise UsageError(f"--time: expected a Slurm time (MINUTES, HH:MM:SS, DAYS-HH:MM:SS, ...), got {text!r}")
    days, first, second, third = match.groups()
    if days is not None:
        return ((int(days) * 24 + int(first)) * 60 + int(second or 0)) * 60 + int(third or 0)
    if third is not None:
        return (int(first) * 60 + int(second)) * 60 + int(third)
    return int(first) * 60 + int(second or 0)


@dataclass(frozen=True)
class ArrayRequest:
    """What the job array asks Slurm for (each field is one `#SBATCH` line; None leaves it to the
    cluster's defaults)."""

    tasks: int
    parallel: int | None = None  # at most this many tasks at once: --array=0-N-1%P, P capped at the tasks
    time: str | None = None
    partition: str | None = None
    gpus_per_task: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    warn_s: int = DEFAULT_WARN_S

    def __post_init__(self) -> None:
        if not 1 <= self.tasks <= 100_000:
            raise UsageError(f"--tasks: expected an int in [1, 100000], got {self.tasks}")
        if self.parallel is not None and not 1 <= self.parallel <= 100_000:
            raise UsageError(f"--parallel: expected an int in [1, 100000], got {self.parallel}")
        for flag, value in (("--gpus-per-task", self.gpus_per_task), ("--cpus-per-task", self.cpus_per_task)):
            if value is not None and not 1 <= value <= 1024:
                raise UsageError(f"{flag}: expected an int in [1, 1024], got {value}")
        if self.mem is not None and not _MEM.fullmatch(self.mem):
            raise UsageError(f"--mem: expected Slurm's memory per node (e.g. 8G, 500M), got {self.mem!r}")
        if self.partition is not None and not re.fullmatch(r"[A-Za-z0-9_.,-]+", self.partition):
            raise UsageError(f"--partition: expected a partition name, got {self.partition!r}")
        if not 10 <= self.warn_s <= 65535:
            raise UsageError(f"--warn-s: expected seconds in [10, 65535], got {self.warn_s}")
        limit = time_limit_s(self.time) if self.time is not None else None
        if limit is not None and self.warn_s >= limit:
            raise UsageError(f"--warn-s {self.warn_s} must be below --time ({limit} s): the warning comes that "
                             "long before the time limit")

    @property
    def array(self) -> str:
        return f"0-{self.tasks - 1}" + (f"%{min(self.parallel, self.tasks)}" if self.parallel else "")

    def directives(self, job_name: str, logs: Path, workdir: Path) -> list[str]:
        lines = [f"--job-name={job_name}", f"--array={self.array}", "--ntasks=1",
                 f"--output={logs}/%x-%A_%a.out", "--open-mode=append", f"--chdir={workdir}",
                 "--requeue", f"--signal=B:{WARN_SIGNAL}@{self.warn_s}"]
        optional = {"--time": self.time, "--partition": self.partition, "--gpus-per-task": self.gpus_per_task,
                    "--cpus-per-task": self.cpus_per_task, "--mem": self.mem}
        lines += [f"{flag}={value}" for flag, value in optional.items() if value is not None]
        return [f"#SBATCH {line}" for line in lines]


def tasks_for(trials: int, stack: int) -> int:
    """One array task per trial still to run, a stack's trials counting once."""
    return max(1, math.ceil(trials / max(1, stack)))


def check_no_password(flag: str, url: str | None) -> None:
    """A URL that carries a password (user:password@, or ?password= as libpq and SQLAlchemy read it) would
    put it in the job script: refused, naming where it goes instead (a passfile= by path is fine)."""
    if not url:
        return
    parsed = urlparse(url)
    in_query = any(key.strip().lower() == "password" for key, _ in parse_qsl(parsed.query, keep_blank_values=True))
    if parsed.password is not None or in_query:
        where = ("~/.pgpass or a file PGPASSFILE names" if url.startswith(("postgresql", "mysql"))
                 else "~/.mlflow/credentials or MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
        raise UsageError(f"{flag}: the URL holds a password, which would be written into the job script; "
                         f"leave it out of the URL and put it in {where} on the nodes")


def check_path(flag: str, path: Path) -> None:
    """A path written into an `#SBATCH` line, which Slurm splits at whitespace and which ends at a newline."""
    if re.search(r"\s", str(path)):
        raise UsageError(f"{flag}: {str(path)!r} holds whitespace, which an #SBATCH line cannot carry; submit from "
                         "a folder whose path has none")


def write_private(path: Path, text: str) -> None:
    """`text` into `path`, readable by its owner alone (0600) from the first byte: the script names the
    services and the credential files."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)  # a script there before keeps no wider mode
        out.write(text)


def job_name(spec_name: str) -> str:
    return "vaelab-" + _NAME_CHARS.sub("_", spec_name)


def job_script(spec_path: Path, overrides: list[str], request: ArrayRequest, *, spec_name: str, python: str,
               workdir: Path, logs: Path, storage: str | None, tracking_uri: str, pgpassfile: str | None,
               heartbeat_s: float, grace_s: float) -> str:
    """The job-array script: one `vaelab worker` per task, its settings exported, never a password."""
    check_no_password("--storage", storage)
    check_no_password("--tracking-uri", tracking_uri)
    check_path("the submit folder (--chdir)", workdir)
    check_path("the log folder (--output)", logs)
    worker = [python, "-m", "vaelab", "worker", str(spec_path)]
    for item in overrides:
        worker += ["--set", item]
    worker += ["--heartbeat-s", f"{heartbeat_s:g}", "--grace-s", f"{grace_s:g}"]
    exports = [f"export MLFLOW_TRACKING_URI={shlex.quote(tracking_uri)}"]
    if storage:
        exports.append(f"export VAELAB_STORAGE={shlex.quote(storage)}")
    else:
        exports.append(f"# the study's journal file is under {workdir}/studies/: every node must see that folder")
    if pgpassfile:
        exports.append(f"export PGPASSFILE={shlex.quote(pgpassfile)}")
    return "\n".join([
        "#!/usr/bin/env bash",
        f"# vaelab sweep '{spec_name}': one `vaelab worker` per array task, written by `vaelab sweep --slurm`.",
        "# Passwords: ~/.pgpass (or PGPASSFILE) and ~/.mlflow/credentials on the nodes, or the environment that",
        "# sbatch carries over from the submitting shell; never this file or a command line.",
        "# Near the time limit Slurm sends USR1 (B: to this shell, which `exec` makes the worker): the worker",
        "# stops its trial after the epoch under way, saves its state, gives the point back and requeues this",
        "# task, which resumes the same MLflow run. A preemption's TERM stops the trial at once (its run resumes",
        "# from the last epoch's end) and Slurm requeues the task (--requeue); a task killed outright leaves its",
        "# trial to the lease (--grace-s).",
        *request.directives(job_name(spec_name), logs, workdir),
        "set -euo pipefail",
        "trap '' USR1  # a warning that comes before vaelab listens for it must not end the task",
        "export PYTHONUNBUFFERED=1  # each progress line reaches the log when it is said",
        "export VAELAB_SLURM_TASK=1  # the worker listens for Slurm's signals (vaelab.sweeps.slurm_task)",
        *exports,
        'exec ' + " ".join(shlex.quote(part) for part in worker) + ' --threads "${SLURM_CPUS_PER_TASK:-1}"',
        "",
    ])


def submit(script: Path) -> str:
    """`sbatch --parsable SCRIPT`; the job id. A refusal is one line naming sbatch's reason."""
    try:
        done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise SweepError("--slurm: no sbatch here; submit from a machine of the Slurm cluster") from None
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise SweepError(f"sbatch refused {script}: {reason}")
    return done.stdout.strip().split(";")[0]


def record_job(study: Any, job_id: str, request: ArrayRequest, script: Path) -> None:
    """The array's record in the study, one attribute per job (two submissions never overwrite each other)."""
    study.set_user_attr(JOB_ATTR + job_id, json.dumps({
        "job": job_id, "array": request.array, "time": request.time, "partition": request.partition,
        "script": str(script), "submitted": time.strftime("%Y-%m-%d %H:%M:%S")}))


def recorded_jobs(user_attrs: dict[str, Any]) -> list[dict[str, Any]]:
    """The job records `record_job` left in the study; one that is not (edited, damaged) is one error line."""
    jobs = []
    for key, value in user_attrs.items():
        if not key.startswith(JOB_ATTR):
            continue
        try:
            job = json.loads(value)
        except (TypeError, ValueError) as err:
            raise SweepError(f"study attribute {key!r}: not a Slurm job record ({type(err).__name__})") from None
        if not isinstance(job, dict) or not all(isinstance(job.get(k), str) for k in ("job", "array", "submitted")):
            raise SweepError(f"study attribute {key!r}: not a Slurm job record (job, array, submitted)")
        jobs.append(job)
    return sorted(jobs, key=lambda job: job["submitted"])


def _run(command: list[str]) -> tuple[int, str, str]:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return 127, "", f"{command[0]}: not found here"
    except subprocess.TimeoutExpired:
        return 124, "", f"{command[0]}: no answer in 60 s"
    return done.returncode, done.stdout, done.stderr


def task_lines(job_ids: list[str]) -> list[str]:
    """The arrays' tasks as Slurm tells them: `squeue` (pending and running tasks), then `sacct` where the
    cluster keeps accounting (every task, ended ones included); where it does not, that is said."""
    if not job_ids:
        return ["no Slurm job array recorded for this study (vaelab sweep SPEC --slurm submits one)"]
    lines: list[str] = []
    code, out, err = _run(["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%i|%T|%M|%L|%R"])
    rows = [row.split("|") for row in out.splitlines() if row.strip()]
    if code != 0 and not rows:
        reason = (err.strip().splitlines() or [f"exit code {code}"])[-1]
        if "Invalid job id" not in reason:
            lines.append(f"squeue: {reason}")
    lines.append(f"squeue: {len(rows)} task(s) pending or running")
    lines += [f"  {task:<14} {state:<11} ran {ran:>10}  left {left:>10}  {where}" for task, state, ran, left, where
              in rows]
    code, out, err = _run(["sacct", "-n", "-P", "-X", "-j", ",".join(job_ids), "-o", "JobID,State,Elapsed,ExitCode"])
    if code != 0:
        reason = (err.strip().splitlines() or [f"exit code {code}"])[-1]
        lines.append(f"sacct: {reason}: tasks that ended are not listed, only squeue's (pending and running)")
        return lines
    done = [row.split("|") for row in out.splitlines() if row.strip()]
    lines.append(f"sacct: {len(done)} task(s)")
    lines += [f"  {task:<14} {state:<11} ran {ran:>10}  exit {code_}" for task, state, ran, code_ in done]
    return lines


def request_from(args: Any, trials: int, stack: int) -> ArrayRequest:
    """The array `vaelab sweep --slurm`'s flags ask for; --tasks defaults to one per trial still to run."""
    return ArrayRequest(tasks=tasks_for(trials, stack) if args.tasks is None else args.tasks,
                        parallel=args.parallel, time=args.time,
                        partition=args.partition, gpus_per_task=args.gpus_per_task,
                        cpus_per_task=args.cpus_per_task, mem=args.mem,
                        warn_s=DEFAULT_WARN_S if args.warn_s is None else args.warn_s)


def script_for(spec: Any, spec_path: Path, args: Any, request: ArrayRequest, folder: Path) -> str:
    """`job_script` for a spec and `vaelab sweep`'s arguments, with the storage and tracking URIs the
    submitting shell resolves (--storage, $VAELAB_STORAGE, search.storage; --tracking-uri,
    $MLFLOW_TRACKING_URI, runs/mlflow.db) and $PGPASSFILE by path."""
    import sys

    from vaelab.sweeps.storage import storage_url
    from vaelab.tracking import resolve_tracking_uri

    pgpass = os.environ.get("PGPASSFILE")
    return job_script(spec_path.resolve(), list(args.set), request, spec_name=spec.name, python=sys.executable,
                      workdir=Path.cwd(), logs=folder / "logs", storage=storage_url(spec, args.storage),
                      tracking_uri=resolve_tracking_uri(args.tracking_uri),
                      pgpassfile=str(Path(pgpass).resolve()) if pgpass else None,
                      heartbeat_s=args.heartbeat_s, grace_s=args.grace_s)


def submit_sweep(spec: Any, spec_path: Path, args: Any) -> int:
    """`vaelab sweep SPEC --slurm`: the study prepared here (spec checked, parent run, points queued), then
    its job array written to studies/NAME/slurm/NAME.sbatch, submitted, and recorded in the study.
    With --dry-run, the script is printed and nothing is touched."""
    from vaelab.search import GridSearch, expand_grid
    from vaelab.sweeps.commands import check_timing
    from vaelab.sweeps.storage import STUDIES_DIR, study_dir

    check_timing(args)  # the workers' heartbeat and grace, refused here rather than in every task

    stack = getattr(spec.search, "stack", 1)
    folder = study_dir(spec.name, STUDIES_DIR) / "slurm"
    if args.dry_run:
        trials = (len(expand_grid(spec.search, spec.base)) if isinstance(spec.search, GridSearch)
                  else spec.search.n_trials)
        print(script_for(spec, spec_path, args, request_from(args, trials, stack), folder), end="")
        return 0
    request_from(args, 1, stack)  # flags checked before the study is touched
    check_no_password("--storage", args.storage or os.environ.get("VAELAB_STORAGE"))
    check_no_password("--tracking-uri", args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    from vaelab.sweeps.coordinator import Sweep

    sweep = Sweep(spec, args.storage, tracking_uri=args.tracking_uri, allow_spec_change=args.allow_spec_change,
                  heartbeat_s=args.heartbeat_s, grace_s=args.grace_s)
    sweep.prepare()
    pending = sweep.pending()
    if pending == 0:
        print(f"sweep '{spec.name}' is already complete; nothing submitted ({sweep.counts().line()})")
        return 0
    request = request_from(args, pending, stack)
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    script = folder / f"{spec.name}.sbatch"
    write_private(script, script_for(spec, spec_path, args, request, folder))
    job = submit(script)
    record_job(sweep.study, job, request, script)
    print(job)
    print(f"sweep '{spec.name}': Slurm job array {job} (tasks {request.array}, one worker each) for {pending} "
          f"trials to run; script {script}, logs in {folder / 'logs'}/; `vaelab status {spec_path}` shows its "
          "points and tasks", flush=True)
    return 0
