"""Running claimed trials: each goes to the same `runner.run_group` that `vaelab train` uses
(one run, or a group that trains as one stacked model), as an MLflow child run under the
sweep's parent run, and its outcome goes back to the queue as soon as the run is settled. A
retried point whose earlier run had FINISHED (its worker died before telling the trial) takes
that run as its outcome instead of training again: each point finishes once in MLflow."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial, Trial

from vaelab import progress, runner
from vaelab.errors import LeaseLost, RunInProgress, RunPruned
from vaelab.resume import clear_state, holding
from vaelab.runlog import CONFIG_TAG
from vaelab.runner.start import resume_folder
from vaelab.search import OptunaSearch, Point, own_keys
from vaelab.spec import Spec
from vaelab.sweeps.artifacts import attach_figures
from vaelab.sweeps.points import child_run_name, trial_point
from vaelab.sweeps.queue import MLFLOW_RUN, RETRY_OF, TrialQueue
from vaelab.tracking import Tracker
from vaelab.training import EpochCallback
from vaelab.training.session import request_stop

INTERRUPTED = "interrupted (Ctrl-C)"
POINT_TAG = "vaelab.sweep_point"  # a child run's point, as its label says it
# Why this worker was asked to stop, once it was (else None): Slurm's warning or TERM, vaelab.sweeps.slurm_task.
Stop = Callable[[], str | None]


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


class TrialRunner:
    """Runs one spec's claimed trials and tells the queue how each ended."""

    def __init__(self, spec: Spec, queue: TrialQueue, tracker: Tracker, artifacts: Path | None = None):
        if spec.search is None:
            raise ValueError("a sweep needs a search section")
        self.spec, self.search = spec, spec.search
        self.queue, self.tracker = queue, tracker
        self.artifacts = artifacts  # the study's Optuna artifact folder (vaelab.sweeps.artifacts); None: none

    def _name(self, number: int, values: dict[str, Any]) -> str:
        return child_run_name(number, values, own_keys(self.search, self.spec.base, values))

    def _tags(self, trial: Trial, point: Point, parent: str) -> dict[str, Any]:
        return {"mlflow.parentRunId": parent, "optuna.study": self.spec.name, "optuna.trial_number": trial.number,
                POINT_TAG: point.label, CONFIG_TAG: point.config}

    def _on_start(self, trial: Trial, name: str, show_progress: bool) -> Callable[[str], None]:
        def record(run_id: str) -> None:
            self.queue.set_attr(trial, MLFLOW_RUN, run_id)
            if show_progress:  # a log says whose epochs follow
                progress.say(f"trial {trial.number}: run {run_id} ({name})")

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

    def run(self, trial: Trial, parent: str, on_epoch: Callable[[int, dict], None] | None = None,
            on_trial: Callable[[FrozenTrial], None] | None = None, stop: Stop | None = None,
            show_progress: bool = False) -> FrozenTrial | None:
        """Train `trial`'s point; a failed run fails its trial alone and the sweep goes on.
        `on_trial` gets the trial once it is told (see run_stack); `stop` and `show_progress` as there.
        None: its point went back to the queue."""
        finished = self._run_group([trial], parent, [[self._pruning(trial, on_epoch)]], on_trial, stop,
                                   show_progress)
        return finished[0] if finished else None

    def run_stack(self, trials: list[Trial], parent: str, on_trial: Callable[[FrozenTrial], None] | None = None,
                  stop: Stop | None = None, show_progress: bool = False) -> list[FrozenTrial]:
        """Grid trials that share a stack key, trained as one stacked model, each
        with its own MLflow child run; a run that fails fails its trial alone. Each
        trial is told as soon as its run is settled, and `on_trial` gets it then. Once `stop`
        says why, training stops after the epoch under way (after its first, if it had not begun)
        and the points go back to the queue with that reason. `show_progress`: the runs'
        lines (an epoch, an evaluator), as `vaelab train` says them."""
        return self._run_group(trials, parent, None, on_trial, stop, show_progress)

    @staticmethod
    def _stop_after_epoch(stop: Stop) -> EpochCallback:
        """A stop asked for before training began (which forgets earlier ones) is asked again at an epoch's end."""
        def check(_epoch: int, _metrics: dict[str, float]) -> None:
            if stop() is not None:
                request_stop()

        return check

    def _tell(self, trial: Trial, outcome: runner.RunOutcome | BaseException,
              why: str = INTERRUPTED) -> FrozenTrial | None:
        """Tell the queue how `trial`'s run ended; None for a run stopped by Ctrl-C (or Slurm: `why`),
        whose point goes back."""
        if isinstance(outcome, LeaseLost):
            return self._fenced(trial, outcome)
        if isinstance(outcome, KeyboardInterrupt):
            self.queue.give_back(trial, why)
            return None
        if isinstance(outcome, RunPruned):
            return self.queue.prune(trial)
        if isinstance(outcome, BaseException):
            return self.queue.fail(trial, _reason(outcome))
        # Before it is told (Optuna takes nothing on a finished trial), and only where runs draw figures: a worker
        # killed between its run's end and the trial's completion leaves the point to be trained again, so that
        # window takes no storage or tracking call more than it did before figures were attached.
        if self.artifacts is not None and self.spec.base.eval.figures:
            attach_figures(self.tracker, outcome.run_id, trial, self.queue.storage, self.artifacts)
        return self.queue.complete(trial, outcome.best(self.search.metric), outcome.metrics["test/elbo"])

    def _attempts(self, trial: Trial) -> set[str]:
        """The numbers of the trials this point ran under before `trial` (its RETRY_OF chain): a run carries the
        number of the trial that last opened or resumed it (its `optuna.trial_number` tag)."""
        by_number = {t.number: t for t in self.queue.trials()}
        chain: set[str] = set()
        number = trial.user_attrs.get(RETRY_OF)
        while number is not None and str(number) not in chain:
            chain.add(str(number))
            earlier = by_number.get(int(number))
            number = earlier.user_attrs.get(RETRY_OF) if earlier is not None else None
        return chain

    def _adopt(self, trial: Trial, point: Point, parent: str, told: _Told, i: int) -> bool:
        """Whether `trial` was told from its point's FINISHED run under `parent`: a retried point whose earlier
        worker died after that run ended and before its trial was told. The run is the point's outcome (its kept
        epoch's validation metric, as the worker would have told it), so the point is not trained a second time.
        Only a run of this point's own earlier trials counts (an Optuna search may sample a point twice). Only
        retried trials look (two tracking queries and a read of the study); a lookup that fails trains the
        point, as before."""
        if RETRY_OF not in trial.user_attrs:
            return False
        metric = f"best/{self.search.metric}"
        run_hash = point.run.hash()
        try:
            attempts = self._attempts(trial)
            runs = [run for run, tags in self.tracker.finished_children(parent, run_hash)
                    if tags.get("optuna.trial_number") in attempts and metric in run.metrics
                    and "test/elbo" in run.metrics]
        except Exception as err:  # noqa: BLE001 - the worst case is the old one: the point trains again
            progress.say(f"trial {trial.number}: could not look for an earlier finished run of its point "
                         f"({type(err).__name__}); training it")
            return False
        if not runs:
            return False
        run = runs[-1]
        try:  # what the trial and the dashboard keep of the run: worth a warning, not the point's outcome
            self.queue.set_attr(trial, MLFLOW_RUN, run.run_id)
            if self.artifacts is not None and self.spec.base.eval.figures:
                attach_figures(self.tracker, run.run_id, trial, self.queue.storage, self.artifacts)
        except Exception as err:  # noqa: BLE001
            progress.say(f"trial {trial.number}: could not attach run {run.run_id} ({type(err).__name__})")
        self._drop_state(resume_folder(self.tracker, self.spec.name, run_hash))
        progress.say(f"trial {trial.number}: its point's run {run.run_id} had finished before its worker died; "
                     "told from it, not trained again")
        told.record(i, self.queue.complete(trial, run.metrics[metric], run.metrics["test/elbo"]))
        return True

    @staticmethod
    def _drop_state(folder: Path) -> None:
        """A finished run's resume state, left when its worker died before clearing it: gone, or `vaelab train`
        would take the run for resumable and train it again. Still held: its worker is alive and clears it."""
        try:
            with holding(folder):
                clear_state(folder)
        except RunInProgress:
            pass

    def _settler(self, told: _Told, i: int) -> Callable[[runner.RunOutcome | BaseException], None]:
        """runner.run_group's on_settled for member i: tell its trial at once."""
        def tell(outcome: runner.RunOutcome | BaseException) -> None:
            if isinstance(outcome, KeyboardInterrupt):
                # Given back once run_group has returned: until then it holds the run's state lock, and a
                # worker that claimed the point at once would find the run busy (RunInProgress).
                told.stops.append(outcome)
                told.done[i] = None
                told.held.append(i)
                return
            told.record(i, self._tell(told.trials[i], outcome, told.why()))

        return tell

    def _run_group(self, trials: list[Trial], parent: str, epoch_callbacks: list[list[EpochCallback]] | None,
                   on_trial: Callable[[FrozenTrial], None] | None, stop: Stop | None = None,
                   show_progress: bool = False) -> list[FrozenTrial]:
        """Run `trials` through runner.run_group, telling each as its run settles. An error that stops
        the whole group touches only the trials not told yet: a second Ctrl-C after some runs were
        settled gives back the others, and the settled ones stay as they were told."""
        points = [trial_point(t, self.spec) for t in trials]
        pairs = list(zip(trials, points, strict=True))
        told = _Told(trials, on_trial, stop)
        names = [self._name(t.number, p.values) for t, p in pairs]
        starts = [self._on_start(t, n, show_progress) for t, n in zip(trials, names, strict=True)]
        callbacks = [list(cbs) for cbs in epoch_callbacks] if epoch_callbacks else [[] for _ in trials]
        if stop is not None:
            for member in callbacks:
                member.append(self._stop_after_epoch(stop))
        with self.queue.beating(trials):
            try:
                try:
                    todo = [i for i, (t, p) in enumerate(pairs) if not self._adopt(t, p, parent, told, i)]
                    if todo:
                        runner.run_group([points[i].run for i in todo], self.spec.name, self.tracker,
                                         show_progress=show_progress,
                                         extra_tags=[self._tags(trials[i], points[i], parent) for i in todo],
                                         epoch_callbacks=[callbacks[i] for i in todo], names=[names[i] for i in todo],
                                         on_start=[starts[i] for i in todo],
                                         guards=[self._guard(trials[i]) for i in todo],
                                         on_settled=[self._settler(told, i) for i in todo])
                except KeyboardInterrupt:  # Ctrl-C: the points not told yet go back for the next `vaelab sweep`
                    for i in told.untold():
                        told.done[i] = None
                        self.queue.give_back(trials[i], told.why())
                    raise
                except LeaseLost as err:  # every open member's lease went together (the network was away)
                    for i in told.untold():
                        told.record(i, self._fenced(trials[i], err))
                except Exception as err:  # the whole group failed (bad data, out of memory): each trial says why
                    for i in told.untold():
                        told.record(i, self._tell(trials[i], err))
            finally:  # run_group has let go of the runs' state: the stopped ones can be resumed by anyone now
                for i in told.held:
                    self.queue.give_back(trials[i], told.why())
        if told.stops:  # a run stopped on Ctrl-C: its point went back, and the sweep stops
            raise told.stops[0]
        return told.finished()


class _Told:
    """The trials of one group told so far (None: given back), in the order they were told."""

    def __init__(self, trials: list[Trial], on_trial: Callable[[FrozenTrial], None] | None, stop: Stop | None):
        self.trials, self.on_trial, self.stop = trials, on_trial, stop
        self.done: dict[int, FrozenTrial | None] = {}
        self.stops: list[KeyboardInterrupt] = []  # runs stopped by a first Ctrl-C
        self.held: list[int] = []  # those runs' trials, given back once run_group has returned

    def record(self, i: int, frozen: FrozenTrial | None) -> None:
        self.done[i] = frozen  # before on_trial: an interrupt raised there must not give this trial back
        if frozen is not None and self.on_trial is not None:
            self.on_trial(frozen)

    def why(self) -> str:
        """Why a run stopped on request goes back: the stop the worker was asked for, else Ctrl-C."""
        return (self.stop() if self.stop is not None else None) or INTERRUPTED

    def untold(self) -> list[int]:
        return [i for i in range(len(self.trials)) if i not in self.done]

    def finished(self) -> list[FrozenTrial]:
        return [frozen for _, frozen in sorted(self.done.items()) if frozen is not None]
