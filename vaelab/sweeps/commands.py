"""`vaelab sweep` and `vaelab worker`: progress, summaries and local worker processes
around vaelab.sweeps.coordinator."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable

from vaelab import progress
from vaelab.search import GridSearch, OptunaSearch, expand_grid
from vaelab.spec import Spec
from vaelab.sweeps.queue import FAILURE, TEST_ELBO, is_replaced
from vaelab.sweeps.slurm_task import TaskStop


def _trial_line(trial, metric: str) -> str:
    params = ", ".join(f"{k}={v}" for k, v in trial.params.items())
    state = trial.state.name.lower()
    if trial.value is not None:
        result = f"{metric} {trial.value:.2f}"
        if TEST_ELBO in trial.user_attrs:
            result += f", test/elbo {trial.user_attrs[TEST_ELBO]:.2f}"
    else:
        result = trial.user_attrs.get(FAILURE, "")
    return f"trial {trial.number:>3} {state:<8} {params}  {result}".rstrip()


def _summary(sweep, counts) -> str:
    lines = [f"sweep '{sweep.spec.name}': {counts.line()}"]
    if counts.best_value is not None:
        params = ", ".join(f"{k}={v}" for k, v in counts.best_params.items())
        lines.append(f"best {sweep.search.metric} {counts.best_value:.3f} ({sweep.search.direction}) at {params}")
    return "\n".join(lines)


def _say_spec_changes(sweep) -> None:
    if sweep.spec_changes:
        print(f"sweep '{sweep.spec.name}': the study's spec is replaced (--allow-spec-change): "
              f"{'; '.join(sweep.spec_changes)}; its runs go under a new parent run, and the report covers "
              "only this spec's runs")


def dry_run(spec: Spec) -> int:
    import pandas as pd

    from vaelab.cost import EvaluationCost, evaluation_cost, seconds_per_epoch
    from vaelab.evaluation.plan import describe as describe_evaluation

    search = spec.search
    if isinstance(search, GridSearch):
        points = expand_grid(search, spec.base)
        table = pd.DataFrame([p.values for p in points])
        table.index.name = "point"
        print(table.to_markdown())
        runs = [p.run for p in points]
        print(f"\n{len(points)} runs ({len(points) // len(search.seeds)} points x {len(search.seeds)} seeds)")
    else:
        assert isinstance(search, OptunaSearch)
        rows = [{"key": k, "kind": d.kind, "low": d.low, "high": d.high, "log": d.log,
                 "choices": list(d.choices) or None} for k, d in search.params]
        print(pd.DataFrame(rows).to_markdown(index=False))
        print(f"\n{search.n_trials} trials, sampler {search.sampler}, pruner {search.pruner}, "
              f"{search.direction} {search.metric}")
        runs = [spec.base] * search.n_trials
    print("\nevaluation of each run (vaelab.evaluation):")
    for line in describe_evaluation(spec.base):
        print(f"  {line}")
    if search.evaluate is not None:
        print(f"  then, once the sweep is done: {search.evaluate.label()} (vaelab evaluate)")
    # Cost: time the distinct configurations once, then add up (early stopping may cut training).
    cache: dict[tuple, tuple[float, EvaluationCost]] = {}
    train_s = eval_s = 0.0
    for run in runs:
        key = (run.model, run.data.subset, run.train.batch_size, run.train.epochs, run.loss.likelihood,
               run.train.device, run.eval)
        if key not in cache:
            cache[key] = (seconds_per_epoch(run), evaluation_cost(run))
        epoch_s, cost = cache[key]
        train_s += epoch_s * run.train.epochs
        eval_s += cost.total
    rates = sorted({round(c.images_per_s) for _, c in cache.values()})
    print(f"rough cost on this machine, one worker: at most {_amount(train_s)} of training "
          f"({sum(r.train.epochs for r in runs)} model-epochs) + about {_amount(eval_s)} of evaluation and figures")
    per_run = ", ".join(f"{k} {v:.0f} s" for k, v in next(iter(cache.values()))[1].seconds.items())
    print(f"  measured: training steps on random data; inference at {', '.join(map(str, rates))} images/s; "
          f"t-SNE of random points. One run's evaluation: {per_run}")
    return 0


def _amount(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def check_timing(args: argparse.Namespace) -> None:
    """A heartbeat must come well within the grace period, or live trials are taken for dead."""
    from vaelab.errors import UsageError

    if not 0 < args.heartbeat_s <= args.grace_s / 3:
        raise UsageError(f"--heartbeat-s {args.heartbeat_s:g} must be positive and at most a third of --grace-s "
                         f"({args.grace_s:g})")


def run_sweep(spec: Spec, args: argparse.Namespace) -> int:
    from vaelab.sweeps.coordinator import Sweep

    check_timing(args)
    progress.use_bars(not args.no_progress)  # no bars; the plain lines stay
    sweep = Sweep(spec, args.storage, tracking_uri=args.tracking_uri, allow_spec_change=args.allow_spec_change,
                  heartbeat_s=args.heartbeat_s, grace_s=args.grace_s)
    parent = sweep.prepare()
    _say_spec_changes(sweep)
    counts = sweep.counts()
    pending = sweep.pending(counts)
    if pending == 0:
        sweep.finish(parent)
        print(f"sweep '{spec.name}' is already complete; nothing to run.\n{_summary(sweep, counts)}")
        _final_evaluation(sweep, parent, show_progress=True)
        return 0
    if counts.done:
        print(f"resuming sweep '{spec.name}': {counts.line()}")
    metric = sweep.search.metric
    # The bar counts what the queue holds, so it cannot read 100% while trials still wait. In a log (or with
    # --no-progress) there is no bar: a line says where the sweep starts, each trial's line how many are done,
    # and a last line how long it took (vaelab.progress).
    total = counts.done + pending
    bar = progress.bar(total, spec.name, "trial", initial=counts.done, count=True)
    plain = not progress.bars_shown()
    if plain:
        progress.say(f"{spec.name}: {counts.done}/{total} trials done, {pending} to run")

    def on_trial(trial) -> None:
        bar.update(1)
        done = f"  [{bar.n:.0f}/{total} done]" if plain else ""
        progress.say(_trial_line(trial, metric) + done, sys.stdout)

    def on_epoch(trial, epoch: int, metrics: dict) -> None:
        if not plain:  # a log gets the trial's line when it ends, not its epochs
            bar.set_postfix_str(f"trial {trial.number} epoch {epoch} val/loss {metrics['val/loss']:.2f}")

    try:
        if args.workers <= 1:
            sweep.work(parent, on_trial=on_trial, on_epoch=on_epoch)
        else:
            _run_local_workers(sweep, args, on_trial)
    finally:
        bar.close()
    counts = sweep.finish(parent)
    print(_summary(sweep, counts))
    _final_evaluation(sweep, parent, show_progress=True)
    if sweep.pending(sweep.counts()) == 0:
        _report(spec, sweep, args)
    return 0


def _report(spec: Spec, sweep, args: argparse.Namespace) -> None:
    """The study's report once every trial is done, written as `make report` writes it (and so also onto
    the sweep's parent run); a report that cannot be made is said, and the sweep still succeeds."""
    from vaelab.errors import ReportError
    from vaelab.report import write_study_report
    from vaelab.report.optuna_section import optuna_report_section
    from vaelab.sweeps.storage import study_dir

    try:
        path = write_study_report(spec, sweep.tracker, study_dir(spec.name, sweep.studies_root),
                                  optuna_figures=lambda folder: optuna_report_section(spec, args.storage, folder))
    except ReportError as err:
        print(f"no report: {err}")
        return
    print(f"report: {path} (also on the sweep's parent run, under report/)")


def _final_evaluation(sweep, parent: str, show_progress: bool, quiet: bool = False) -> None:
    """search.evaluate, once the sweep is done (vaelab.sweeps.final)."""
    from vaelab.sweeps.final import final_evaluation

    if sweep.search.evaluate is None:
        return

    def said(done) -> None:
        if not quiet:
            shown = ", ".join(f"{k} {v:.2f}" for k, v in done.evaluation.metrics.items()
                              if k.startswith("test/nll_iw") or k.startswith("test/bits"))
            print(f"evaluated run {done.run_id} ({sweep.search.evaluate.label()}): {shown or 'nothing new'}",
                  flush=True)

    final_evaluation(sweep, parent, show_progress=show_progress, on_run=said)


def worker_command(args: argparse.Namespace, threads: int) -> list[str]:
    """The `vaelab worker` command line of one local worker of this `vaelab sweep`."""
    command = [sys.executable, "-m", "vaelab", "worker", args.spec, "--quiet", "--threads", str(threads)]
    for item in args.set:
        command += ["--set", item]
    if args.storage:
        command += ["--storage", args.storage]
    if args.tracking_uri:
        command += ["--tracking-uri", args.tracking_uri]
    if args.allow_spec_change:
        command += ["--allow-spec-change"]
    command += ["--heartbeat-s", str(args.heartbeat_s), "--grace-s", str(args.grace_s)]
    return command


def _run_local_workers(sweep, args: argparse.Namespace, on_trial: Callable) -> None:
    """Start `--workers` processes on this machine and report their trials as they finish."""
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    workers = [subprocess.Popen(worker_command(args, threads)) for _ in range(args.workers)]
    seen = {t.number for t in sweep.trials() if t.state.is_finished()}
    try:
        while True:
            alive = [w for w in workers if w.poll() is None]
            for trial in sweep.trials():
                if trial.state.is_finished() and trial.number not in seen:
                    seen.add(trial.number)
                    if not is_replaced(trial):
                        on_trial(trial)
            if not alive:
                break
            time.sleep(1.0)
    except KeyboardInterrupt:
        for worker in workers:
            worker.terminate()
        raise
    # A worker that crashed leaves its trial RUNNING: the next `prepare` re-queues it.
    sweep.reap_dead()


def run_worker(spec: Spec, args: argparse.Namespace, stop: TaskStop | None = None) -> int:
    """`vaelab worker`. Unless --quiet, each run says its lines (an epoch, an evaluator: a plain line each in a
    log, vaelab.progress) and each trial one when it is told. `stop`: a Slurm task's (vaelab.sweeps.slurm_task):
    once it is asked, the worker claims nothing more, its trial stops after the epoch under way and goes back,
    and a warned task requeues itself."""
    import torch

    from vaelab.sweeps.coordinator import Sweep

    check_timing(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    sweep = Sweep(spec, args.storage, tracking_uri=args.tracking_uri, sampler_seed_offset=os.getpid(),
                  allow_spec_change=args.allow_spec_change, heartbeat_s=args.heartbeat_s, grace_s=args.grace_s)
    parent = sweep.prepare()
    if not args.quiet:
        _say_spec_changes(sweep)
    metric = sweep.search.metric

    def on_trial(trial) -> None:
        if not args.quiet:
            print(_trial_line(trial, metric), flush=True)

    try:
        ran = sweep.work(parent, on_trial=on_trial, stop=stop.asked if stop else None, show_progress=not args.quiet)
    except KeyboardInterrupt as err:
        if stop is None or not stop.requeue:
            raise
        print(f"vaelab: {str(err) or 'stopped'}; handed back", file=sys.stderr, flush=True)
        return _requeue(sweep, stop)
    if not args.quiet:
        print(f"worker {os.getpid()} ran {ran} trials; {sweep.counts().line()}", flush=True)
    if stop is not None and stop.asked() is not None and (not stop.requeue or sweep.pending() > 0):
        return _requeue(sweep, stop) if stop.requeue else 0
    # A warning that came while the last trial was evaluated leaves nothing to requeue: the sweep ends here.
    sweep.finish(parent)  # the last worker to finish closes the parent run
    _final_evaluation(sweep, parent, show_progress=False, quiet=args.quiet)
    return 0


def _requeue(sweep, stop: TaskStop) -> int:
    """A warned Slurm task whose trials are handed back: requeued while points still wait, so its next life
    resumes them; 0 either way (the points are in the queue)."""
    if sweep.pending() == 0:
        return 0
    return 0 if stop.requeue_task() else 1
