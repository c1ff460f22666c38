"""The run's stages: spec -> data + models + preflight -> run logs opened (resume states held) ->
`training.fit_group` -> each member finished (evaluation, figures, checkpoint) and its run ended.
`run` and `run_stack` are the one- and many-run faces of `run_group`."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack

from vaelab import preflight, progress
from vaelab.data import ImageData
from vaelab.errors import LeaseLost, RunStopped
from vaelab.models.build import check_labels
from vaelab.models.footprint import attach
from vaelab.registry import load_dataset
from vaelab.resume import clear_state, holding
from vaelab.runlog import HASH_TAG, RunLogs
from vaelab.runner.figures import epoch_figures
from vaelab.runner.finish import finish
from vaelab.runner.keep import kept_checkpoints
from vaelab.runner.outcome import RunOutcome, run_name
from vaelab.runner.start import Opened, open_member, resume_folder, run_tags
from vaelab.spec import RunSpec
from vaelab.training import EpochCallback, MemberResult, RunResult, fit_group, init_model, resolve_device
from vaelab.training.session import forget_stop, stop_requested


def run(
    run_spec: RunSpec,
    experiment: str,
    logs: RunLogs,
    show_progress: bool = True,
    extra_tags: dict[str, str] | None = None,
    epoch_callbacks: list[EpochCallback] | None = None,
    on_start: Callable[[str], None] | None = None,
    name: str | None = None,
    guard: Callable[[], None] | None = None,
) -> RunOutcome:
    """Train and evaluate one run, recording everything in a run log opened from `logs` (a
    `vaelab.tracking.Tracker`, or `vaelab.runlog.MemoryRuns`); raises what ended it (a failure,
    a pruner's decision, RunStopped after Ctrl-C). Bad input (data, model shape) raises before
    any run is opened."""
    (outcome,) = run_group([run_spec], experiment, logs, show_progress, [extra_tags or {}],
                           [list(epoch_callbacks or [])], [on_start] if on_start else None, [name] if name else None,
                           [guard] if guard else None)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def run_stack(
    run_specs: list[RunSpec],
    experiment: str,
    logs: RunLogs,
    show_progress: bool = True,
    extra_tags: list[dict[str, str]] | None = None,
    on_start: list[Callable[[str], None]] | None = None,
    names: list[str] | None = None,
    guards: list[Callable[[], None]] | None = None,
) -> list[RunOutcome | BaseException]:
    """Train runs that differ only in stackable keys (vaelab.training.stacked) as one
    stacked model, each recorded as its own run with its own metrics, figures,
    checkpoint and resume state. Returns, per run, its outcome or the error that ended
    it alone (RunStopped for a run stopped by Ctrl-C, which resumes)."""
    return run_group(run_specs, experiment, logs, show_progress, extra_tags, None, on_start, names, guards)


def run_group(
    run_specs: list[RunSpec],
    experiment: str,
    logs: RunLogs,
    show_progress: bool = True,
    extra_tags: list[dict[str, str]] | None = None,
    epoch_callbacks: list[list[EpochCallback]] | None = None,
    on_start: list[Callable[[str], None]] | None = None,
    names: list[str] | None = None,
    guards: list[Callable[[], None]] | None = None,
    on_settled: list[Callable[[RunOutcome | BaseException], None]] | None = None,
) -> list[RunOutcome | BaseException]:
    """The one path of a run: one run, or several that share a stack key, trained by
    vaelab.training.fit_group and each finished (test metrics, figures, checkpoint)
    in its own run log. Runs resuming from different epochs train one group after
    another. An error that stops them all (bad data, a second Ctrl-C) ends every open
    run and raises; runs settled before it keep their outcome. `guards[i]` is called
    before every write to run i's log (a sweep's fencing: it raises LeaseLost
    once the run is another worker's). `on_settled[i]` gets run i's outcome as soon as
    its run is ended, before the next run is settled: a sweep tells Optuna there,
    so an error that comes later gives back only the runs not yet told."""
    k = len(run_specs)
    forget_stop()
    device = resolve_device(run_specs[0].train.device)
    check_labels(run_specs[0])  # a conditional model on data without labels: refused before any image is decoded
    data = load_dataset(run_specs[0].data, device, show_progress)
    # Every phase's memory estimated on the meta device, and refused in one line, before a weight is built.
    flight = preflight.check(run_specs, data.shape, len(data.train), len(data.test), device)
    if show_progress:
        progress.say(flight.line)
    models = [init_model(r, data.shape, device) for r in run_specs]
    for model in models:
        attach(model, flight.footprint)  # evaluation and figures chunk their rows by the run's budget
    datasets = data.records()
    extra_tags = extra_tags or [{} for _ in run_specs]
    names = names or [run_name(r) for r in run_specs]
    outcomes: dict[int, RunOutcome | BaseException] = {}
    opened: dict[int, Opened] = {}
    with ExitStack() as held:
        try:
            for i, r in enumerate(run_specs):
                tags = {**run_tags(r, data, device, flight, extra_tags[i]), **({"vaelab.stacked": k} if k > 1 else {})}
                held.enter_context(holding(resume_folder(logs, experiment, tags[HASH_TAG])))
                opened[i] = open_member(logs, r, experiment, names[i], tags, on_start[i] if on_start else None,
                                        datasets, guards[i] if guards else None)
                prior = opened[i].prior
                if show_progress and prior is not None:
                    progress.say(f"resuming run {opened[i].log.run_id} ({names[i]}) after epoch {prior.epoch} of "
                                 f"{r.train.epochs}")
            by_epoch: dict[int, list[int]] = {}
            for i, o in opened.items():
                by_epoch.setdefault(o.prior.epoch if o.prior else 0, []).append(i)
            for group in by_epoch.values():
                results = _fit(group, run_specs, models, data, opened, epoch_callbacks, show_progress)
                for i, member in zip(group, results, strict=True):
                    outcomes[i] = _settle(run_specs[i], experiment, models[i], data, member, opened[i], show_progress)
                    del opened[i]
                    if on_settled is not None:
                        on_settled[i](outcomes[i])
        except BaseException as err:
            for o in opened.values():
                o.log.end(err)
            raise
    return [outcomes[i] for i in range(k)]


def _fit(group: list[int], run_specs: list[RunSpec], models: list, data: ImageData, opened: dict[int, Opened],
         epoch_callbacks: list[list[EpochCallback]] | None, show_progress: bool) -> list[MemberResult]:
    """Train one group of members that resume from the same epoch. An error of the group's
    own (out of memory, a compiler crash) fails its members, not runs already settled; a
    stop asked for while an earlier group trained stops this one before it starts."""
    if stop_requested():
        return [MemberResult(RunResult(), RunStopped("stopped before training on request; the same command "
                                                     "resumes it")) for _ in group]
    try:
        return fit_group(
            [run_specs[i] for i in group], [models[i] for i in group], data,
            callbacks=[[opened[i].timed.log_epoch, epoch_figures(run_specs[i], models[i], data, opened[i].log),
                        *kept_checkpoints(run_specs[i], models[i], data, opened[i], show_progress),
                        *(epoch_callbacks[i] if epoch_callbacks else [])] for i in group],
            resumes=[opened[i].prior for i in group], save_states=[opened[i].save for i in group],
            show_progress=show_progress)
    except Exception as err:
        return [MemberResult(RunResult(), err) for _ in group]


def _settle(run_spec: RunSpec, experiment: str, model, data: ImageData, member: MemberResult, opened: Opened,
            show_progress: bool) -> RunOutcome | BaseException:
    """End a trained member's run: finished with its test metrics, figures and
    checkpoint, or with the error that ended it. A stopped run keeps its resume state.
    A member whose lease is lost (a sweep's fencing) at any point here writes nothing more:
    its sampler stops, its state goes, and the LeaseLost is its outcome alone."""
    try:
        return _settle_member(run_spec, experiment, model, data, member, opened, show_progress)
    except LeaseLost as err:
        opened.log.stop_system_metrics()
        clear_state(opened.folder)
        return err


def _settle_member(run_spec: RunSpec, experiment: str, model, data: ImageData, member: MemberResult,
                   opened: Opened, show_progress: bool) -> RunOutcome | BaseException:
    log = opened.log
    if isinstance(member.error, LeaseLost):
        raise member.error
    if member.result.notes:
        log.set_tags({"vaelab.notes": "; ".join(member.result.notes)})
    if isinstance(member.error, KeyboardInterrupt):  # stopped on request: resumable from its saved state
        log.end(member.error)
        return member.error
    try:
        if member.error is not None:
            raise member.error
        outcome = finish(run_spec, experiment, model, data, member.result, log, opened.timed.seconds, show_progress)
        log.end()
    except LeaseLost:
        raise
    except Exception as err:  # this run fails alone
        log.end(err)
        clear_state(opened.folder)
        return err
    clear_state(opened.folder)
    return outcome
