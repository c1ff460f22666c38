"""`vaelab train | sweep | worker | status | evaluate | report | ledger | sample | reconstruct | encode | ui | keys`:
the command line. Bad input ends in one line on stderr and exit code 2 (vaelab.errors);
a failed run in exit code 1; a stop by Ctrl-C in 130."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from vaelab import progress
from vaelab.errors import RunFailure, SpecError, UsageError, UserInputError, VaelabError
from vaelab.tracking import quiet_mlflow

if TYPE_CHECKING:
    from vaelab.runlog import RunLogs
    from vaelab.runner import RunOutcome
    from vaelab.spec import RunSpec, Spec

EXPERIMENTS_DIR = Path("experiments")


def invoked_as() -> str:
    """This program as the user can type it from here (for hints): `vaelab` when that is
    on PATH, else the path it was started by (`.venv/bin/vaelab`), else `python -m vaelab`."""
    program = Path(sys.argv[0])
    if program.name == "vaelab":
        found = shutil.which("vaelab")
        return "vaelab" if found and Path(found).resolve() == program.resolve() else os.path.relpath(program)
    return f"{os.path.relpath(sys.executable)} -m vaelab"


def resolve_spec_path(name_or_path: str) -> Path:
    """A path to a YAML file, or a bare name looked up as experiments/NAME.yaml."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = EXPERIMENTS_DIR / f"{name_or_path}.yaml"
    if "/" not in name_or_path and candidate.is_file():
        return candidate
    known = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))
    raise SpecError(f"{name_or_path}: no such spec file" + (f"; known specs: {', '.join(known)}" if known else ""))


def _cmd_train(args: argparse.Namespace) -> int:
    from vaelab.spec import load_spec, to_dict

    spec = load_spec(resolve_spec_path(args.spec), args.set)
    if args.dry_run:
        import yaml

        from vaelab.evaluation.plan import describe
        from vaelab.kept import plan_lines as kept_checkpoints

        print(yaml.safe_dump({"name": spec.name, "description": spec.description, "base": to_dict(spec.base)},
                             sort_keys=False), end="")
        print("# evaluation after training (`vaelab sweep --dry-run` times it):")
        for line in describe(spec.base):
            print(f"#   {line}")
        for line in kept_checkpoints(spec.base):
            print(f"# {line}")
        return 0
    logs: RunLogs
    if args.no_track:  # a run log in memory: no tracking store is opened, mlflow is never imported
        from vaelab.runlog import MemoryRuns

        if args.tracking_uri:
            raise UsageError("--no-track records nothing in a tracking store: leave out --tracking-uri")
        logs = MemoryRuns(Path(args.out) / spec.name)
    else:
        from vaelab.tracking import Tracker

        logs = tracker = Tracker(args.tracking_uri)
        tracker.describe_experiment(spec.name, spec.description)
    outcome, trained = _trained_or_named(spec, logs, args.again)
    where = (f"not tracked (--no-track): its files are in {args.out}/{spec.name}/" if args.no_track
             else f"in experiment '{spec.name}' ({tracker.shown_uri})")
    if trained:
        print(f"run {outcome.run_id} FINISHED {where}")
    else:
        print(f"run {outcome.run_id} of this very spec (the same vaelab.run_hash) FINISHED before {where}: not "
              "trained again (--again trains another copy)")
        for key in _set_outside_identity(spec.base):
            print(f"  {key} does not change a run's identity: --again trains a copy that uses it")
    if not args.no_track:
        print(f"  {tracker.run_url(outcome.run_id)}" + ("" if tracker.uri.startswith("http") else
                                                        "  (after `make ui`)"))
    from vaelab.evaluation.evaluators import metrics as evaluator_metrics

    for key in [metric.key for _, metric in evaluator_metrics() if metric.in_table]:  # what report tables show
        if key in outcome.metrics:
            print(f"  {key:<18} {outcome.metrics[key]:.4f}")
    print("  (nats per image; test/elbo is the negative ELBO and test/nll_iw the importance-weighted NLL:"
          " lower is better)")
    if outcome.checkpoint_dir is not None:
        print(f"checkpoint: {outcome.checkpoint_dir}")
        print(f"  {invoked_as()} sample {outcome.checkpoint_dir} --n 64 --out samples.png")
    return 0


def _trained_or_named(spec: Spec, logs: RunLogs, again: bool) -> tuple[RunOutcome, bool]:
    """`vaelab train`'s run and whether it trained now: trained, or, where this very spec (the same run
    hash) has a FINISHED run already and no stopped run of it resumes, that run named instead (`--again`
    trains another copy, tagged vaelab.copy_of). MemoryRuns (--no-track) holds this process's runs only."""
    from vaelab.resume import STATE_FILE, state_dir
    from vaelab.runlog import COPY_TAG
    from vaelab.runner import RunOutcome, run

    run_hash = spec.base.hash()
    resumable = (state_dir(logs.resume_root, spec.name, run_hash) / STATE_FILE).is_file()
    twin = None if resumable else logs.latest_finished(spec.name, run_hash)
    if twin is not None and not again:
        return RunOutcome(twin.run_id, twin.metrics, twin.artifact_uri, [], 0), False
    return run(spec.base, spec.name, logs, show_progress=True,
               extra_tags={COPY_TAG: twin.run_id} if twin is not None else None), True


def _set_outside_identity(run_spec: RunSpec) -> list[str]:
    """Keys this spec sets away from their defaults that a run's hash leaves out (HOW_NOT_WHAT): a finished
    run of the same hash did not necessarily use them (train.keep_every, say)."""
    from vaelab.spec import HOW_NOT_WHAT, RunSpec, flatten

    default = flatten(RunSpec())
    return sorted(key for key, value in flatten(run_spec).items() if key in HOW_NOT_WHAT and default.get(key) != value)


def _load_sweep_spec(args: argparse.Namespace):
    from vaelab.spec import load_spec

    spec = load_spec(resolve_spec_path(args.spec), args.set)
    if spec.search is None:
        raise SpecError(f"search: missing in {args.spec}; a sweep needs a search section (grid or optuna)")
    return spec


def _cmd_sweep(args: argparse.Namespace) -> int:
    from vaelab.sweeps import commands as sweep_commands

    if args.workers < 1 or args.workers > 64:
        raise UsageError(f"--workers: expected an int in [1, 64], got {args.workers}")
    if args.slurm and args.workers != 1:
        raise UsageError("--workers: a Slurm sweep's workers are its array tasks (--tasks, --parallel)")
    if not args.slurm:  # the job array's flags mean nothing to a sweep on this machine
        given = [flag for flag, dest in SLURM_FLAGS if getattr(args, dest) is not None]
        if given:
            raise UsageError(f"{given[0]}: only with --slurm (the job array's shape); add --slurm or leave it out")
    spec = _load_sweep_spec(args)
    if args.slurm:  # the job array: written, submitted and recorded (or, with --dry-run, printed)
        from vaelab.sweeps.slurm import submit_sweep

        return submit_sweep(spec, resolve_spec_path(args.spec), args)
    if args.dry_run:
        return sweep_commands.dry_run(spec)
    return sweep_commands.run_sweep(spec, args)


def _cmd_worker(args: argparse.Namespace) -> int:
    from vaelab.sweeps import commands as sweep_commands
    from vaelab.sweeps.slurm_task import TaskStop

    # Inside a Slurm task its warning (USR1) and TERM stop the trial after its epoch, and a warned task
    # requeues itself (vaelab.sweeps.slurm_task); listening starts before the spec is read.
    stop = TaskStop.install()
    return sweep_commands.run_worker(_load_sweep_spec(args), args, stop)


def _cmd_status(args: argparse.Namespace) -> int:
    from vaelab.sweeps.status import status_lines

    for line in status_lines(_load_sweep_spec(args), args.storage):
        print(line)
    return 0


def _evaluation_targets(args: argparse.Namespace, tracker) -> list[str]:
    """Run ids or checkpoint folders: the target itself, or a study's top runs by a validation metric."""
    from vaelab.search import METRICS

    target = args.target
    if target.startswith(("models:/", "runs:/")) or Path(target).is_dir() or (
            args.top is None and not _names_a_spec(target)):
        return [target]
    from vaelab.spec import load_spec

    spec = load_spec(resolve_spec_path(target))
    by = args.by or (spec.search.metric if spec.search is not None else "val/elbo")
    if by not in METRICS:
        raise UsageError(f"--by: expected one of {', '.join(METRICS)}, got {by!r}")
    maximize = spec.search is not None and spec.search.direction == "maximize" and by == spec.search.metric
    runs = tracker.best_runs(spec.name, f"best/{by}", ascending=not maximize, n=args.top or 1)
    if not runs:
        raise UsageError(f"{target}: no finished runs of '{spec.name}' in {tracker.shown_uri}")
    return runs


def _names_a_spec(target: str) -> bool:
    try:
        resolve_spec_path(target)
        return True
    except SpecError:
        return False


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from vaelab.evaluation.later import evaluate_finished
    from vaelab.evaluation.stage import select
    from vaelab.tracking import Tracker

    if args.top is not None and not 1 <= args.top <= 10_000:
        raise UsageError(f"--top: expected an int in [1, 10000], got {args.top}")
    evaluators = select(args.metrics.split(",") if args.metrics else None)
    tracker = Tracker(args.tracking_uri)
    for target in _evaluation_targets(args, tracker):
        done = evaluate_finished(target, tracker, args.set, evaluators, device=args.device,
                                 show_progress=True, explicit=bool(args.metrics))
        print(f"run {done.run_id}: {', '.join(done.evaluation.ran) or 'nothing new'}")
        for key, value in done.evaluation.metrics.items():
            if not key.startswith(("time/", "test/kl_dim/")):
                print(f"  {key:<28} {value:.4f}")
        for note in done.evaluation.skipped:
            print(f"  skipped {note}")
        print(f"  {tracker.run_url(done.run_id)}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from vaelab.report import ReportError, write_study_report
    from vaelab.report.optuna_section import optuna_report_section
    from vaelab.spec import load_spec
    from vaelab.sweeps.storage import STUDIES_DIR, study_dir
    from vaelab.tracking import Tracker, resolve_tracking_uri, store_exists

    spec = load_spec(resolve_spec_path(args.spec))
    uri = resolve_tracking_uri(args.tracking_uri)
    if not store_exists(uri):
        raise ReportError(f"no runs of '{spec.name}' in {uri}; run `make sweep EXP={spec.name}` first")
    out_dir = Path(args.out) if args.out else study_dir(spec.name, STUDIES_DIR)
    path = write_study_report(spec, Tracker(uri), out_dir,
                              optuna_figures=lambda folder: optuna_report_section(spec, args.storage, folder))
    print(f"wrote {path}")
    if args.html:
        from vaelab.report.html import write_html

        print(f"wrote {write_html(path)} (figures inlined: one file to share)")
    return 0


def _cmd_ledger(args: argparse.Namespace) -> int:
    from vaelab.ledger import run_ledger

    names = [name.strip() for name in args.rows.split(",") if name.strip()] if args.rows else None
    printed = run_ledger(Path(args.folder), args.quick, args.tracking_uri, args.set, args.data_root, names,
                         program=invoked_as())
    for line in printed.lines:
        print(line)
    if printed.failed:  # the table is printed all the same; the exit code says it is not whole
        print(f"vaelab ledger: {len(printed.failed)} row(s) could not train: {', '.join(printed.failed)}",
              file=sys.stderr)
        return 1
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from vaelab.ops.serve import check_port_free, serve
    from vaelab.spec import load_spec
    from vaelab.sweeps.artifacts import artifact_dir
    from vaelab.sweeps.dashboard import ARTIFACTS_ENV, STORAGE_ENV, dashboard_command, dashboard_storage

    spec = load_spec(resolve_spec_path(args.spec))
    if spec.search is None:
        raise UsageError(f"{args.spec}: no search section, so no Optuna study to show")
    check_port_free(args.host, args.port)
    target = dashboard_storage(spec, args.storage)
    return serve([*dashboard_command(), args.host, str(args.port)], args.host, args.port,
                 f"optuna-dashboard ({spec.name})",
                 env={STORAGE_ENV: target, ARTIFACTS_ENV: str(artifact_dir(spec.name))},
                 url_path="/dashboard")


def _cmd_register(args: argparse.Namespace) -> int:
    from vaelab.search import METRICS
    from vaelab.spec import load_spec
    from vaelab.tracking import Tracker, register_best

    spec = load_spec(resolve_spec_path(args.spec))
    if args.by not in METRICS:
        raise UsageError(f"--by: expected one of {', '.join(METRICS)} (validation metrics only), got {args.by}")
    tracker = Tracker(args.tracking_uri)
    # Every validation metric a sweep ranks by is a loss: lower is better.
    name, version, run_id, value = register_best(tracker, spec.name, f"best/{args.by}", True, args.name or spec.name)
    print(f"registered run {run_id} ({args.by} {value:.3f}, the lowest) as {name} version {version}: "
          f"models:/{name}/{version}")
    return 0


def _png_out(value: str) -> Path:
    out = Path(value)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out: expected a .png file name, got {value}")
    if not out.parent.is_dir():
        raise UsageError(f"--out: folder {out.parent} does not exist")
    return out


def _cmd_sample(args: argparse.Namespace) -> int:
    from vaelab.figures import write_samples
    from vaelab.loaded import load

    if args.n < 1 or args.n > 10_000:
        raise UsageError(f"--n: expected an int in [1, 10000], got {args.n}")
    out = _png_out(args.out)
    model = load(args.checkpoint, args.tracking_uri, args.device)
    if args.label is not None and not model.conditional:
        raise UsageError("--label: this model is not conditional (model.conditional=false); leave it out")
    label = None if args.label is None else model.label_index(args.label, "--label")
    # A conditional model without --label draws a row per class, each row named.
    write_samples(model.model, model.likelihood, out, n=args.n, seed=args.seed, label=label,
                  class_names=model.classes)
    of = f", class {model.classes[label]}" if label is not None else ""
    classes = model.model.num_classes
    written = args.n if label is not None or not classes else max(1, args.n // classes) * classes
    if classes and label is None:
        of += f", {written // classes} of each of {classes} classes"
    print(f"wrote {written} samples from {model.name} ({model.run_spec.model.arch}, z_dim={model.z_dim}{of}) to {out}")
    return 0


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    import torch
    from torchvision.utils import save_image

    from vaelab.loaded import load

    out = _png_out(args.out)
    model = load(args.checkpoint, args.tracking_uri, args.device)
    # A conditional model's code depends on the label: it must be given (by name or index), never assumed.
    x = model.images(args.image)
    recon = model.reconstruct(x, model.labels(args.label, 1, "--label"))
    save_image(torch.cat([x.cpu(), recon]), out, nrow=2, padding=2, pad_value=1.0)
    print(f"wrote original | reconstruction of {args.image} to {out}")
    return 0


def _cmd_encode(args: argparse.Namespace) -> int:
    from vaelab.encode import check_out, from_images, from_split, write_latents
    from vaelab.loaded import load

    if (args.images is None) == (args.split is None):
        raise UsageError("give exactly one of --images FILE_OR_FOLDER and --split train|val|test")
    out = check_out(Path(args.out))
    model = load(args.target, args.tracking_uri, args.device)
    if args.split is not None:
        if args.label is not None:
            raise UsageError("--label: a split's images have their own labels; leave it out")
        latents = from_split(model, args.split, show_progress=True)
    else:
        latents = from_images(model, Path(args.images), args.label, show_progress=True)
    write_latents(latents, out, {"target": args.target, "run_id": model.run_id or "", "z_dim": model.z_dim})
    print(f"wrote the latent means and log-variances of {len(latents)} images (z_dim={model.z_dim}) to {out}")
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    from vaelab.ops.serve import check_port_free, serve
    from vaelab.tracking import ML_VIEW, Store, ui_command

    check_port_free(args.host, args.port)  # before opening the store: a taken port is the first thing said
    command = ui_command(Store(args.tracking_uri), host=args.host, port=args.port)
    # One user on a laptop: one server worker, and no GenAI job runners (MLflow 3 starts several by default,
    # which is what made the UI take 25-45 s to answer on two cores).
    return serve([sys.executable, "-m", "mlflow", *command[1:]], args.host, args.port, "MLflow UI",
                 env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, url_path="/#/experiments" + ML_VIEW)


def _cmd_services(args: argparse.Namespace) -> int:
    from vaelab.ops.services import Layout, run_services

    layout = Layout(args.dir.resolve(), args.host, args.pg_port, args.mlflow_port)
    return run_services(layout, (args.only,) if args.only else ("postgres", "mlflow"), workers=args.workers,
                        names=tuple(args.name))


def _cmd_keys(args: argparse.Namespace) -> int:
    from vaelab.spec import describe_fields

    for path, default, allowed, doc in describe_fields():
        print(f"{path:<20} default {default!r:<14} {allowed}. {doc}")
    return 0


def _cmd_completion(args: argparse.Namespace) -> int:
    from vaelab.completion import script
    from vaelab.spec import describe_fields

    print(script(build_parser(), [path for path, *_ in describe_fields()]), end="")
    return 0


def _add_spec_args(parser: argparse.ArgumentParser, storage: bool = False) -> None:
    """The arguments every spec-running command shares."""
    parser.add_argument("spec", help="experiments/NAME.yaml, or just NAME")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a base value, e.g. --set model.z_dim=10 (repeatable)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or runs/mlflow.db)")
    if storage:
        parser.add_argument("--storage", help="Optuna RDB URL shared by all workers (default: a journal in "
                                              "studies/NAME/)")
        parser.add_argument("--allow-spec-change", action="store_true",
                            help="run this spec in a study made from another one (its stored spec is replaced "
                                 "and the new points join the study); without it such a run is refused")
        parser.add_argument("--heartbeat-s", type=float, default=10.0,
                            help="seconds between a running trial's heartbeats (default 10)")
        parser.add_argument("--grace-s", type=float, default=60.0,
                            help="a trial whose heartbeat is older than this is re-queued, and a worker cut off "
                                 "that long stops it (default 60; keep it above the longest network outage "
                                 "you expect)")


# `vaelab sweep --slurm`'s own flags (flag, argparse dest): refused without --slurm.
SLURM_FLAGS = (("--tasks", "tasks"), ("--parallel", "parallel"), ("--partition", "partition"), ("--time", "time"),
               ("--gpus-per-task", "gpus_per_task"), ("--cpus-per-task", "cpus_per_task"), ("--mem", "mem"),
               ("--warn-s", "warn_s"))


def _add_slurm_args(parser: argparse.ArgumentParser) -> None:
    """`vaelab sweep --slurm`: the job array's shape (vaelab.sweeps.slurm); any other sbatch option through its
    SBATCH_* environment variable (SBATCH_ACCOUNT, SBATCH_QOS, ...)."""
    group = parser.add_argument_group("Slurm (--slurm)")
    group.add_argument("--slurm", action="store_true",
                       help="submit the sweep as a Slurm job array, one `vaelab worker` per task, and print the job "
                            "id (with --dry-run: print the script)")
    group.add_argument("--tasks", type=int, help="array tasks (default: one per trial still to run, a stack's "
                                                 "trials counting once)")
    group.add_argument("--parallel", type=int, help="at most this many tasks at once (--array=0-N-1%%P)")
    group.add_argument("--partition", help="Slurm partition (default: the cluster's)")
    group.add_argument("--time", help="each task's time limit, as Slurm writes it: MINUTES, HH:MM:SS, D-HH:MM:SS "
                                      "(default: the partition's)")
    group.add_argument("--gpus-per-task", type=int, help="GPUs per task (default: none)")
    group.add_argument("--cpus-per-task", type=int, help="CPUs per task, also the worker's torch threads "
                                                         "(default: the cluster's, usually 1)")
    group.add_argument("--mem", help="memory per task's node, as Slurm writes it: 8G, 500M (default: the cluster's)")
    group.add_argument("--warn-s", type=int,
                       help="seconds before the time limit that Slurm warns a task (USR1; it may come up to a minute "
                            "earlier): its trial stops after the epoch under way and the task requeues itself; "
                            "leave room for an epoch (default 180)")


def _metrics_help() -> str:
    """`vaelab evaluate --metrics`: every evaluator and the metrics it logs, from their records."""
    from vaelab.evaluation.evaluators import EVALUATORS

    listed = "; ".join(f"{e.name} ({', '.join(m.shown for m in e.metrics)})" for e in EVALUATORS.values())
    return f"evaluators to run, comma-separated (default: every one that applies, in this order): {listed}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vaelab", description="Tracked VAE experiments from YAML specs.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train one run from a spec's base")
    _add_spec_args(train)
    train.add_argument("--dry-run", action="store_true", help="print the resolved spec and exit")
    train.add_argument("--no-progress", action="store_true",
                       help="no progress bars: one plain line per epoch and evaluator instead "
                            "(what a log file gets anyway)")
    train.add_argument("--no-track", action="store_true",
                       help="record nothing in a tracking store (MLflow is not used): print the results and write "
                            "the checkpoint and figures under --out")
    train.add_argument("--out", default="untracked", help="with --no-track: the folder for the run's files, "
                                                          "in OUT/NAME/RUN_ID/ (default untracked/)")
    train.add_argument("--again", action="store_true",
                       help="train another copy of a spec that has a FINISHED run already (tagged vaelab.copy_of; "
                            "without it that run is named, not trained again); a stopped run still resumes")
    train.set_defaults(func=_cmd_train)

    sweep = sub.add_parser("sweep", help="run a spec's whole search (grid or optuna); rerun to resume")
    _add_spec_args(sweep, storage=True)
    sweep.add_argument("--dry-run", action="store_true", help="print the expanded runs and a rough cost, run nothing")
    sweep.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    sweep.add_argument("--no-progress", action="store_true",
                       help="no progress bar: a plain line per finished trial with the count done "
                            "(what a log file gets anyway)")
    _add_slurm_args(sweep)
    sweep.set_defaults(func=_cmd_sweep)

    worker = sub.add_parser("worker", help="join a sweep as one more worker (this or another machine)")
    _add_spec_args(worker, storage=True)
    worker.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    worker.add_argument("--quiet", action="store_true", help="print nothing per trial")
    worker.set_defaults(func=_cmd_worker)

    status = sub.add_parser("status", help="a study's points by state, beside its Slurm job arrays' tasks "
                                           "(squeue, and sacct where the cluster keeps accounting)")
    status.add_argument("spec", help="experiments/NAME.yaml, or just NAME")
    status.add_argument("--storage", help="Optuna RDB URL of the study (default: $VAELAB_STORAGE, search.storage, "
                                          "or its journal in studies/NAME/)")
    status.set_defaults(func=_cmd_status, set=[])

    evaluate = sub.add_parser("evaluate", help="evaluate finished runs again (any evaluators and settings), "
                                               "into the same MLflow runs")
    evaluate.add_argument("target", help="an MLflow run id, a checkpoint folder, a models:/ or runs:/ URI, or a study "
                                         "(NAME or spec file)")
    evaluate.add_argument("--set", action="append", default=[], metavar="eval.KEY=VALUE",
                          help="evaluation settings, e.g. --set eval.iw_samples=5000 (default: every test image, "
                               "the reference sample sizes)")
    evaluate.add_argument("--metrics", help=_metrics_help())
    evaluate.add_argument("--top", type=int, help="a study's N best finished runs")
    evaluate.add_argument("--by", help="the validation metric that ranks a study's runs (default: its search.metric)")
    evaluate.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    evaluate.add_argument("--no-progress", action="store_true",
                          help="no progress bars: one plain line per evaluator instead")
    evaluate.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                                                  "runs/mlflow.db)")
    evaluate.set_defaults(func=_cmd_evaluate)

    report = sub.add_parser("report", help="write studies/NAME/report.md from the tracking store")
    report.add_argument("spec", help="experiments/NAME.yaml, or just NAME")
    report.add_argument("--out", help="folder for report.md, table.csv, figures/ (default studies/NAME/)")
    report.add_argument("--storage", help="Optuna RDB URL of the study, for Optuna plots")
    report.add_argument("--html", action="store_true", help="also write report.html, figures inlined, for sharing")
    report.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or runs/mlflow.db)")
    report.set_defaults(func=_cmd_report)

    ledger = sub.add_parser("ledger", help="vaelab's test NLL beside the published numbers of experiments/ledger/, "
                                           "nats per image (--quick: train each row briefly first, on a CPU)")
    ledger.add_argument("--quick", action="store_true",
                        help="first train every row a few epochs on a small subset (experiment ledger-quick, never "
                             "mixed with full runs): checks the machinery, compares nothing with the papers")
    ledger.add_argument("--rows", help="comma-separated row names (the spec files' stems; default: every row)")
    ledger.add_argument("--data-root", action="append", default=[], metavar="DATASET=PATH",
                        help="data.root of the rows on DATASET, e.g. --data-root mnist=/data/mnist: where its IDX "
                             "files are (repeatable)")
    ledger.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a base value of every row, e.g. --set train.device=cpu (repeatable)")
    ledger.add_argument("--folder", default="experiments/ledger", help="the ledger's specs (default "
                                                                       "experiments/ledger)")
    ledger.add_argument("--tracking-uri", "--store", dest="tracking_uri",
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or runs/mlflow.db)")
    ledger.add_argument("--no-progress", action="store_true",
                        help="no progress bars: one plain line per epoch and evaluator instead")
    ledger.set_defaults(func=_cmd_ledger)

    board = sub.add_parser("dashboard", help="optuna-dashboard over a study's storage, on 127.0.0.1")
    board.add_argument("spec", help="experiments/NAME.yaml, or just NAME")
    board.add_argument("--storage", help="Optuna RDB URL of the study (default: its journal in studies/NAME/)")
    board.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    board.add_argument("--port", type=int, default=8080)
    board.set_defaults(func=_cmd_dashboard)

    register = sub.add_parser("register", help="put a study's best run in the MLflow Model Registry")
    register.add_argument("spec", help="experiments/NAME.yaml, or just NAME")
    register.add_argument("--by", default="val/elbo", help="validation metric that ranks the runs, lowest best "
                                                          "(default val/elbo)")
    register.add_argument("--name", help="registered model name (default: the study's name)")
    register.add_argument("--tracking-uri")
    register.set_defaults(func=_cmd_register)

    target_help = ("a checkpoint folder (a run's checkpoint/, a kept kept/epoch-NNNN/), models:/NAME/VERSION, "
                   "models:/MODEL_ID, runs:/RUN_ID, or a bare MLflow run id")
    uri_help = "MLflow tracking URI for models:/, runs:/ and run ids (default: $MLFLOW_TRACKING_URI or runs/mlflow.db)"
    label_help = "a class name or index of a conditional model (vaelab names its classes if it is left out)"

    sample = sub.add_parser("sample", help="write a grid of samples from a trained model")
    sample.add_argument("checkpoint", help=target_help)
    sample.add_argument("--tracking-uri", help=uri_help)
    sample.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    sample.add_argument("--out", default="samples.png", help="PNG file to write")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--label", help="a conditional model's class (name or index) for every sample (default: "
                                        "a row per class)")
    sample.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    sample.set_defaults(func=_cmd_sample)

    recon = sub.add_parser("reconstruct", help="encode one image file and write original | reconstruction")
    recon.add_argument("checkpoint", help=target_help)
    recon.add_argument("--tracking-uri", help=uri_help)
    recon.add_argument("image", help="an image file of any size (cropped and resized to the model's input)")
    recon.add_argument("--out", default="reconstruction.png", help="PNG file to write")
    recon.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    recon.add_argument("--label", help=label_help + "; required for one")
    recon.set_defaults(func=_cmd_reconstruct)

    encode = sub.add_parser("encode", help="write latent means and log-variances of images or a data split "
                                           "(.npz or .parquet)")
    encode.add_argument("target", help=target_help)
    source = encode.add_mutually_exclusive_group()
    source.add_argument("--images", help="an image file, or a folder of them (all images under it)")
    source.add_argument("--split", choices=("train", "val", "test"),
                        help="a split of the data the model was trained on, read where its spec says")
    encode.add_argument("--out", default="latents.npz",
                        help="the file to write: .npz (numpy: mu, logvar, label, file or index, classes) or .parquet "
                             "(default latents.npz)")
    encode.add_argument("--label", help=label_help + "; required with --images for one")
    encode.add_argument("--tracking-uri", help=uri_help)
    encode.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    encode.set_defaults(func=_cmd_encode)

    ui = sub.add_parser("ui", help="MLflow UI over the tracking store")
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--tracking-uri")
    ui.set_defaults(func=_cmd_ui)

    services = sub.add_parser("services", help="a lab's shared stack: PostgreSQL + an MLflow server with basic "
                                               "auth and proxied artifacts, on one interface")
    services.add_argument("--host", default="127.0.0.1",
                          help="the address both listen on (default loopback; every connection needs a password)")
    services.add_argument("--pg-port", type=int, default=5432)
    services.add_argument("--mlflow-port", type=int, default=5000)
    services.add_argument("--dir", type=Path, default=Path("services"),
                          help="state and credentials files (default ./services)")
    services.add_argument("--only", choices=["postgres", "mlflow"], help="start one of the two")
    services.add_argument("--workers", type=int, default=2, help="MLflow server worker processes (default 2)")
    services.add_argument("--name", action="append", default=[], metavar="HOSTNAME",
                          help="a DNS name workers reach the MLflow server by (repeatable; its own address and "
                               "loopback are always accepted)")
    services.set_defaults(func=_cmd_services)

    keys = sub.add_parser("keys", help="list every spec key with its default and allowed values")
    keys.set_defaults(func=_cmd_keys)

    completion = sub.add_parser("completion", help="print the shell completion script: eval \"$(vaelab completion "
                                                   "bash)\" in ~/.bashrc (zsh: after bashcompinit)")
    completion.add_argument("shell", choices=("bash", "zsh"), help="the shell (zsh uses bash's completion)")
    completion.set_defaults(func=_cmd_completion)
    return parser


def _install_signal_handlers() -> None:
    """A first Ctrl-C while training lets the current epoch finish, saves the state and
    ends the run KILLED and resumable; a second one (or Ctrl-C at any other time) stops
    at once. `kill` (SIGTERM) stops at once too: the MLflow run is marked KILLED and a
    sweep's trial goes back to the queue, instead of the process vanishing mid-write;
    the state saved at the last epoch's end still resumes it."""

    def on_sigint(_signum, _frame):
        # Only an imported training loop can be training: importing it here would make
        # `keys`, `--dry-run` and spec errors pay torch's import time.
        train = sys.modules.get("vaelab.training.session")
        if train is not None and train.request_stop():
            print("\nvaelab: finishing this epoch, then stopping (Ctrl-C again to stop now)", file=sys.stderr)
            return
        raise KeyboardInterrupt

    def on_sigterm(_signum, _frame):
        raise KeyboardInterrupt("stopped by SIGTERM")

    signal.signal(signal.SIGINT, on_sigint)
    signal.signal(signal.SIGTERM, on_sigterm)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress.use_bars(not getattr(args, "no_progress", False))  # --no-progress: plain lines, no bars
    _install_signal_handlers()
    quiet_mlflow()
    try:
        return args.func(args)
    except UserInputError as err:
        print(f"vaelab: error: {err}", file=sys.stderr)
        return err.exit_code
    except RunFailure as err:
        print(f"vaelab: run failed: {err}", file=sys.stderr)
        return err.exit_code
    except VaelabError as err:
        print(f"vaelab: {err}", file=sys.stderr)
        return err.exit_code
    except Exception as err:
        from vaelab.tracking import storage_problem  # only now: no command's fast path ends here

        problem = storage_problem(err)
        if problem is None:
            raise
        print(f"vaelab: error: {problem}; what was recorded before is intact", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        if "resume" in str(err):  # the stop says how it resumes already: say it once
            print(f"vaelab: {err}; what finished is kept", file=sys.stderr)
        else:
            why = f"{err}; " if str(err) else "interrupted; "
            print(f"vaelab: {why}what finished is kept, and the same command resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
