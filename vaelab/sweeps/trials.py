"""Running claimed trials: each goes to the same `runner.run` that `vaelab train` uses
(or `runner.run_stack` for a group that trains as one stacked model), as an MLflow
child run under the sweep's parent run, and its outcome goes back to the queue."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from optuna.trial import FrozenTrial, Trial

from vaelab import runner
from vaelab.errors import LeaseLost, RunPruned
from vaelab.search import OptunaSearch, Point, own_keys
from vaelab.spec import Spec
from vaelab.sweeps.points import child_run_name, trial_point
from vaelab.sweeps.queue import MLFLOW_RUN, TrialQueue
from vaelab.tracking import Tracker

INTERRUPTED = "interrupted (Ctrl-C)"


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


class TrialRunner:
    """Runs one spec's claimed trials and tells the queue how each ended."""

    def __init__(self, spec: Spec, queue: TrialQueue, tracker: Tracker):
        if spec.search is None:
            raise ValueError("a sweep needs a search section")
        self.spec, self.search = spec, spec.search
        self.queue, self.tracker = queue, tracker

    def _name(self, number: int, values: dict[str, Any]) -> str:
        return child_run_name(number, values, own_keys(self.search, self.spec.base, values))

    def _tags(self, trial: Trial, point: Point, parent: str) -> dict[str, Any]:
        return {"mlflow.parentRunId": parent, "optuna.study": self.spec.name, "optuna.trial_number": trial.number,
                "vaelab.sweep_point": point.label}

    def _on_start(self, trial: Trial) -> Callable[[str], None]:
        def record(run_id: str) -> None:
            self.queue.set_attr(trial, MLFLOW_RUN, run_id)

        return record

    def _guard(self, trial: Trial) -> Callable[[], None]:
        return lambda: self.queue.check_lease(trial)

    def _fenced(self, trial: Trial, err: LeaseLost) -> FrozenTrial:
        """A trial taken from this worker while it could not reach the storage: said in one line; its
        record, its run and its point are the reaper's and the new owner's."""
        print(f"vaelab: {err}", file=sys.stderr, flush=True)
        current = self.queue.storage.get_trial(trial._trial_id)
        run_id = current.user_attrs.get(MLFLOW_RUN)
        if run_id:  # the reaper marks it KILLED, at best effort: no RUNNING run is left behind either way
            try:  # (the point's retry always opens a run of its own, so this one is no one else's)
                self.tracker.kill_run(run_id, str(err))
            except Exception as failure:  # noqa: BLE001 - housekeeping, as the reaper's is
                print(f"vaelab: could not mark run {run_id} KILLED ({type(failure).__name__})", file=sys.stderr)
        return current

    def _pruning(self, trial: Trial, on_epoch: Callable[[int, dict], None] | None) -> Callable[[int, dict], None]:
        metric = self.search.metric
        pruner = self.search.pruner if isinstance(self.search, OptunaSearch) else "none"
        prunes = pruner != "none"

        def report(epoch: int, metrics: dict[str, float]) -> None:
            if on_epoch is not None:
                on_epoch(epoch, metrics)
            if prunes:
                trial.report(metrics[metric], epoch)
                if trial.should_prune():
                    raise RunPruned(f"pruned by the {pruner} pruner at epoch {epoch}")

        return report

    def run(self, trial: Trial, parent: str, on_epoch: Callable[[int, dict], None] | None = None) -> FrozenTrial:
        """Train `trial`'s point; a failed run fails its trial alone and the sweep goes on."""
        point = trial_point(trial, self.spec)
        with self.queue.beating([trial]):
            try:
                outcome = runner.run(point.run, self.spec.name, self.tracker, show_progress=False,
                                     extra_tags=self._tags(trial, point, parent),
                                     name=self._name(trial.number, point.values),
                                     epoch_callbacks=[self._pruning(trial, on_epoch)], on_start=self._on_start(trial),
                                     guard=self._guard(trial))
            except LeaseLost as err:
                return self._fenced(trial, err)
            except RunPruned:
                return self.queue.prune(trial)
            except KeyboardInterrupt:
                # Ctrl-C: give the point back so the next `vaelab sweep` runs it again.
                self.queue.give_back(trial, INTERRUPTED)
                raise
            except Exception as err:  # a bad run (NaN, bad shape) fails alone
                return self.queue.fail(trial, _reason(err))
        return self.queue.complete(trial, outcome.best(self.search.metric), outcome.metrics["test/elbo"])

    def run_stack(self, trials: list[Trial], parent: str) -> list[FrozenTrial]:
        """Grid trials that share a stack key, trained as one stacked model, each
        with its own MLflow child run; a run that fails fails its trial alone."""
        points = [trial_point(t, self.spec) for t in trials]
        pairs = list(zip(trials, points, strict=True))
        with self.queue.beating(trials):
            try:
                outcomes = runner.run_stack([p.run for p in points], self.spec.name, self.tracker, show_progress=False,
                                            extra_tags=[self._tags(t, p, parent) for t, p in pairs],
                                            names=[self._name(t.number, p.values) for t, p in pairs],
                                            on_start=[self._on_start(t) for t in trials],
                                            guards=[self._guard(t) for t in trials])
            except LeaseLost as err:  # every member's lease went together (the network was away)
                return [self._fenced(t, err) for t in trials]
            except KeyboardInterrupt:
                for trial in trials:
                    self.queue.give_back(trial, INTERRUPTED)
                raise
            except Exception as err:  # the whole stack failed (bad data, out of memory): each trial says why
                return [self.queue.fail(t, _reason(err)) for t in trials]
        finished, stopped = [], None
        for trial, outcome in zip(trials, outcomes, strict=True):
            if isinstance(outcome, LeaseLost):
                finished.append(self._fenced(trial, outcome))
            elif isinstance(outcome, KeyboardInterrupt):  # this run stopped on Ctrl-C: its point goes back
                self.queue.give_back(trial, INTERRUPTED)
                stopped = outcome
            elif isinstance(outcome, BaseException):
                finished.append(self.queue.fail(trial, _reason(outcome)))
            else:
                finished.append(self.queue.complete(trial, outcome.best(self.search.metric),
                                                    outcome.metrics["test/elbo"]))
        if stopped is not None:
            raise stopped
        return finished
