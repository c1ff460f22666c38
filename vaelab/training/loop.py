"""The one training loop. A group of members (one for a single run, several for a
stack) trains epoch by epoch through a stepper (vaelab.training.single or .stacked);
everything else a run does at an epoch's end — metrics, the non-finite check and
nan_policy, early stopping and best weights, callbacks, resume state, a stop on
Ctrl-C — is the member's, and so the same for both.

This package never imports mlflow or optuna: tracking and pruning plug in as epoch
callbacks, so the core runs and tests without them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from vaelab import progress
from vaelab.data import ImageData
from vaelab.evaluation.estimators import SPLIT_TERMS
from vaelab.models import VAE
from vaelab.resume import TrainState
from vaelab.spec import flatten
from vaelab.training.member import EpochCallback, Member
from vaelab.training.result import RunResult, train_metrics
from vaelab.training.session import stop_requested, training_session
from vaelab.training.single import SingleStepper
from vaelab.training.stacked import STACKABLE_KEYS, StackedStepper, stack_blocker, stack_key


@dataclass
class MemberResult:
    """One member's training: its history as a single run would record it, or the error that ended it."""

    result: RunResult
    error: BaseException | None = None


def _stepper(members: list[Member], models: list[VAE], data: ImageData):
    optimizer_states = [m.restore(model) for m, model in zip(members, models, strict=True)]
    if len(members) == 1:
        return SingleStepper(members[0], models[0], data, optimizer_states[0])
    return StackedStepper(members, models, data, optimizer_states)


def _train(members: list[Member], models: list[VAE], data: ImageData, show_progress: bool) -> None:
    """Train the members, all at the same epoch, until each is done."""
    stepper = _stepper(members, models, data)
    for i, m in enumerate(members):
        m.begin(stepper, i)
    train = members[0].run.train
    n_batches = math.ceil(len(data.train) / train.batch_size)
    epoch = members[0].start_epoch
    while epoch <= train.epochs and not all(m.done for m in members):
        # A bar per epoch on a terminal; in a log, one line when the epoch ends (vaelab.progress).
        with progress.bar(n_batches, f"epoch {epoch}/{train.epochs}{stepper.label}", "batch",
                          show=show_progress) as bar:
            started = time.perf_counter()
            train_means = stepper.train_epoch(epoch, members, bar)
            epoch_s = time.perf_counter() - started  # a stack's wall time: every member shared the whole of it
            val_means = stepper.validate(members)
            if len(members) == 1:
                bar.set_postfix({"train/loss": f"{train_means[0][0]:.2f}", "val/loss": f"{val_means[0][0]:.2f}"})
            else:
                bar.set_postfix_str("val/loss " + ", ".join(f"{v[0]:.2f}" for v in val_means))
        training = [i for i, m in enumerate(members) if not m.done]
        for i in training:
            m = members[i]
            metrics = train_metrics(m.weighting, epoch, n_batches, *train_means[i])
            metrics.update(stepper.epoch_extras(i))
            metrics["time/epoch_s"] = epoch_s
            metrics.update({f"val/{name}": v for name, v in zip(SPLIT_TERMS, val_means[i], strict=True)})
            m.end_epoch(epoch, metrics, stepper, i)
            if show_progress and m.result.stopped_early and m.error is None:
                progress.say(_member_name(members, i) + m.result.early_stop_line(epoch, train.patience))
        if stop_requested():  # after any epoch, its last included: the run ends KILLED and resumes
            for i in training:
                if members[i].error is None and members[i].rollback is None:
                    members[i].stop(epoch, stepper, i)
        epoch += 1


def _member_name(members: list[Member], i: int) -> str:
    """How a progress line names a stack's member (by the keys stack members may differ in)."""
    if len(members) == 1:
        return ""
    values = flatten(members[i].run)
    return "[" + ", ".join(f"{key}={values[key]}" for key in STACKABLE_KEYS) + "] "


def fit_group(
    runs: list,
    models: list[VAE],
    data: ImageData,
    callbacks: list[list[EpochCallback]] | None = None,
    resumes: list[TrainState | None] | None = None,
    save_states: list[Callable[[TrainState], None] | None] | None = None,
    show_progress: bool = True,
) -> list[MemberResult]:
    """Train `models` (built from `runs`; several only if they share a stack key and
    resume from the same epoch); on return each holds the weights of its best epoch.
    A member whose epoch turns non-finite under nan_policy: retry goes on alone from
    its last good epoch at a tenth of the learning rate."""
    if len({stack_key(r) for r in runs}) != 1:
        raise ValueError("runs in one stack may differ only in " + ", ".join(STACKABLE_KEYS))
    blocked = [b for b in map(stack_blocker, runs) if b] if len(runs) > 1 else []
    if blocked:
        raise ValueError(f"cannot stack: {blocked[0]}")
    k, device = len(runs), data.train.x.device
    resumes = resumes or [None] * k
    if len({r.epoch if r else 0 for r in resumes}) != 1:
        raise ValueError("members of one stack must resume from the same epoch")
    members = [Member(run, device, callbacks=list(cbs), save_state=save, resume=resume)
               for run, cbs, save, resume in zip(runs, callbacks or [[] for _ in runs], save_states or [None] * k,
                                                 resumes, strict=True)]
    with training_session():
        _train(members, models, data, show_progress)
        for i, m in enumerate(members):
            while m.rollback is not None and not stop_requested():
                m = Member(m.run, device, callbacks=m.callbacks, save_state=m.save_state, resume=m.rollback,
                           notes=m.result.notes, announce_resume=False)
                _train([m], [models[i]], data, show_progress)
            if m.rollback is not None:  # a stop came in the epoch that asked for the rollback
                m.stop(m.rollback.epoch)
            members[i] = m
    for model, m in zip(models, members, strict=True):
        if m.best_state:
            model.load_state_dict(m.best_state)
    return [MemberResult(m.result, m.error) for m in members]


def fit(
    run_spec,
    model: VAE,
    data: ImageData,
    callbacks: list[EpochCallback] | None = None,
    show_progress: bool = True,
    resume: TrainState | None = None,
    save_state: Callable[[TrainState], None] | None = None,
) -> RunResult:
    """Train one run in place; on return `model` holds the weights of the best epoch.

    `resume` continues from a saved state (the epochs after it replay exactly as an
    uninterrupted run would have them); `save_state` receives the state after every
    train.checkpoint_every epochs. Raises what ended the run: NonFiniteLossError, a
    callback's error, or RunStopped after the epoch under way when a stop was asked."""
    (outcome,) = fit_group([run_spec], [model], data, [list(callbacks or [])], [resume], [save_state], show_progress)
    if outcome.error is not None:
        raise outcome.error
    return outcome.result


def fit_stack(runs: list, models: list[VAE], data: ImageData,
              callbacks: list[list[EpochCallback]] | None = None, show_progress: bool = True) -> list[MemberResult]:
    """Train runs that share a stack key as one stacked model; each member's error is in its result."""
    return fit_group(runs, models, data, callbacks, show_progress=show_progress)
