"""The trial queue of a study: the only code that touches Optuna's internals (trial
ids, system attributes, the storage's set_trial_* calls).

Exactly once: a worker claims a WAITING trial atomically (the storage refuses a
second claim), and a claimed grid trial that has an older live twin (two processes
enqueued the same point at once) steps aside as a duplicate. Resume: RUNNING trials
whose worker died (its pid is gone on this host, or its heartbeat is older than the
grace period) are failed and their point is enqueued again; finished trials are
never re-run.

Fencing: a worker holds a claimed trial as a lease that each heartbeat the storage takes
renews. Before anything is written to the trial's MLflow run (`check_lease`), a lease
not renewed for half the grace period is renewed first, and a trial found reaped
meanwhile (a worker cut off from the network longer than the grace period, whose point
another worker took over) raises LeaseLost: the old worker writes nothing more.

Clocks: heartbeats are stamped, and judged by reapers, with the database's clock
(RetryingStorage.database_time), so workers whose clocks disagree neither reap live trials
nor keep dead ones; a journal file (one machine) uses the machine's clock.

Lost replies: a claim, a re-queue and a duplicate's retirement each change the trial's state
together with the user attributes that say who did it (storage.transition_trial), so a change
whose reply was lost is recognised as this worker's by reading them back.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, Trial, TrialState

from vaelab.errors import LeaseLost
from vaelab.sweeps.storage import database_cause, transition_trial

log = logging.getLogger(__name__)

# Trial user attributes: the sweep's own bookkeeping, visible in Optuna's dashboard too.
POINT = "grid_point"  # the run hash of a grid point
WORKER = "worker"  # host:pid of the worker that claimed the trial
HEARTBEAT = "heartbeat"  # the worker's last sign of life, in seconds since the epoch by the database's clock
MLFLOW_RUN = "mlflow_run_id"
FAILURE = "failure_reason"
DIED = "worker_died"  # why the trial was reaped; its point was enqueued again
REAPER = "reaped_by"  # host:pid of the worker that reaped it
DUPLICATE = "duplicate_of"  # the number of the older trial that holds the same point
TEST_ELBO = "test_elbo"
RETRY_OF = "retry_of"  # the number of the reaped trial this one runs again
CLAIM_S = "claim_s"  # seconds the worker's winning look at the queue took (reaping included): `make bench-cluster`
# Study user attributes.
PARENT_RUN = "mlflow_parent_run_id"
SPEC_HASH = "vaelab.spec_hash"
SPEC = "vaelab.spec"  # the resolved spec the study was made from, as JSON


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Counts:
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    waiting: int = 0
    replaced: int = 0  # trials of dead workers or duplicates, whose point ran again
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> int:
        return self.complete + self.pruned + self.failed

    @property
    def queued(self) -> int:
        """Trials that hold a point still to finish: running or waiting."""
        return self.running + self.waiting

    def line(self) -> str:
        text = (f"{self.complete} complete, {self.pruned} pruned, {self.failed} failed, "
                f"{self.running} running, {self.waiting} waiting")
        if self.replaced:
            text += f" ({self.replaced} re-queued: given back, or after a dead worker)"
        return text


def is_replaced(trial: FrozenTrial) -> bool:
    """A trial of a dead worker, or a duplicate: another trial holds its point."""
    return trial.state == TrialState.FAIL and (DIED in trial.user_attrs or DUPLICATE in trial.user_attrs)


@dataclass
class Lease:
    """This worker's hold on one claimed trial: when the storage last took a heartbeat for it (monotonic
    seconds), and why it was lost, once it is."""

    renewed: float = field(default_factory=time.monotonic)
    lost: str | None = None


class TrialQueue:
    """Claim, beat for, finish and re-queue the trials of one study.

    `on_reaped(mlflow_run_id, reason)` is called for each reaped trial that had an MLflow run. `clock`: this
    machine's clock (seconds since the epoch), used only where the storage has none of its own (a journal)."""

    def __init__(self, study: optuna.Study, storage: BaseStorage, heartbeat_s: float = 10.0,
                 grace_s: float = 60.0, on_reaped: Callable[[str, str], None] | None = None,
                 clock: Callable[[], float] = time.time):
        self.study, self.storage = study, storage
        self.heartbeat_s, self.grace_s = heartbeat_s, grace_s
        self.on_reaped = on_reaped
        self.clock = clock
        self._leases: dict[int, Lease] = {}  # trial id -> lease, while this worker runs the trial

    # ---- reading -----------------------------------------------------------------------------
    def trials(self) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False)

    def counts(self) -> Counts:
        counts = Counts()
        for trial in self.trials():
            if is_replaced(trial):
                counts.replaced += 1
            elif trial.state == TrialState.COMPLETE:
                counts.complete += 1
            elif trial.state == TrialState.PRUNED:
                counts.pruned += 1
            elif trial.state == TrialState.FAIL:
                counts.failed += 1
            elif trial.state == TrialState.RUNNING:
                counts.running += 1
            elif trial.state == TrialState.WAITING:
                counts.waiting += 1
        if counts.complete:
            best = self.study.best_trial
            counts.best_value, counts.best_params = best.value, dict(best.params)
        return counts

    @staticmethod
    def point_of(trial: Trial | FrozenTrial) -> str | None:
        """The run hash of the grid point `trial` runs (None for an Optuna search's trial)."""
        return trial.user_attrs.get(POINT)

    # ---- grid points -------------------------------------------------------------------------
    def enqueue_missing(self, points: dict[str, dict[str, Any]]) -> int:
        """Enqueue each point (run hash -> Optuna params) that no trial holds yet; returns how many."""
        held = {t.user_attrs.get(POINT) for t in self.trials() if not is_replaced(t)}
        added = 0
        for key, params in points.items():
            if key not in held:
                self.study.enqueue_trial(params, user_attrs={POINT: key})
                held.add(key)
                added += 1
        return added

    # ---- dead workers --------------------------------------------------------------------------
    def _now(self, retry: bool = True) -> float:
        """Now by the clock heartbeats are stamped and judged with: the database's, else `clock`'s."""
        database_time = getattr(self.storage, "database_time", None)
        return float(database_time(retry=retry)) if database_time is not None else self.clock()

    def _death(self, trial: FrozenTrial, now: float) -> str | None:
        host_pid = str(trial.user_attrs.get(WORKER, ""))
        host, _, pid = host_pid.rpartition(":")
        if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
            return f"worker {host_pid} is gone"
        beat = trial.user_attrs.get(HEARTBEAT)
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        last = float(beat) if beat is not None else started
        if now - last > self.grace_s:
            return f"no heartbeat from {host_pid or 'its worker'} for {now - last:.0f} s"
        return None

    def heartbeat_age(self, trial: FrozenTrial) -> float | None:
        """Seconds since `trial`'s last heartbeat by the clock reapers judge it with; None if it has none."""
        beat = trial.user_attrs.get(HEARTBEAT)
        return None if beat is None else self._now() - float(beat)

    def reap_dead(self) -> int:
        """Fail RUNNING trials whose worker died and re-queue their points; returns how many. A worker that
        has just got its storage back (an outage that every worker saw) judges no heartbeat for a grace
        period: the others' heartbeats could not land either."""
        recovered = getattr(self.storage, "recovered_at", None)
        if recovered is not None and time.monotonic() - recovered < self.grace_s:
            return 0
        now, reaped = self._now(), 0
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            reason = self._death(trial, now)
            if reason is not None:
                reaped += self.requeue(trial, reason)
        return reaped

    def requeue(self, trial: FrozenTrial, reason: str) -> int:
        """Fail `trial` as replaced (`reason` says why) and enqueue its point again; 1 if
        this call did it, 0 if the trial finished meanwhile or another process reaped it first."""
        trial_id = trial._trial_id
        try:
            self._move(trial_id, TrialState.FAIL, {DIED: reason, REAPER: worker_id()})
        except UpdateFinishedTrialError:
            return 0
        except Exception as err:  # a storage hiccup: the next reap tries again
            log.warning("trial %d: could not re-queue it (%s: %s); trying again later",
                        trial.number, type(err).__name__, err)
            return 0
        attrs = {k: v for k, v in trial.user_attrs.items() if k == POINT}
        self.study.enqueue_trial(dict(trial.params) or trial.system_attrs.get("fixed_params", {}),
                                 user_attrs={**attrs, RETRY_OF: trial.number})
        if MLFLOW_RUN in trial.user_attrs and self.on_reaped is not None:
            try:  # the point is queued again already: closing its old MLflow run is housekeeping
                self.on_reaped(trial.user_attrs[MLFLOW_RUN], reason)
            except Exception as err:
                log.warning("trial %d: could not mark its MLflow run %s KILLED (%s: %s)", trial.number,
                            trial.user_attrs[MLFLOW_RUN], type(err).__name__, err)
        return 1

    def give_back(self, trial: Trial, reason: str) -> None:
        """Requeue a trial this worker stops running (Ctrl-C), so the next sweep runs it again."""
        self.requeue(self.storage.get_trial(trial._trial_id), reason)

    # ---- claiming ------------------------------------------------------------------------------
    def _move(self, trial_id: int, state: TrialState, attrs: dict[str, Any], stamp: str | None = None) -> bool:
        """`state` with `attrs`, the change's receipt (storage.transition_trial); `stamp`: an attribute set to now."""
        return transition_trial(self.storage, trial_id, state, attrs, stamp, self.clock)

    def _mark_mine(self, trial_id: int) -> None:
        self.storage.set_trial_user_attr(trial_id, WORKER, worker_id())
        self.storage.set_trial_user_attr(trial_id, HEARTBEAT, self._now())

    def _older_twin(self, trial: Trial) -> int | None:
        key = self.point_of(trial)
        if key is None:
            return None
        for other in self.trials():
            if other.number < trial.number and other.user_attrs.get(POINT) == key and not is_replaced(other):
                return other.number
        return None

    def _claim(self, trial_id: int) -> Trial | None:
        """Trial `trial_id` if this worker won it from WAITING and it is not the younger
        twin of a point another trial holds (that one is failed as a duplicate); else None.
        The claim and this worker's mark (WORKER, the first HEARTBEAT) are one change."""
        try:
            if not self._move(trial_id, TrialState.RUNNING, {WORKER: worker_id()}, stamp=HEARTBEAT):
                return None
        except UpdateFinishedTrialError:  # another worker claimed and finished it since we looked
            return None
        claimed = Trial(self.study, trial_id)
        twin = self._older_twin(claimed)
        if twin is not None:
            self._move(trial_id, TrialState.FAIL, {DUPLICATE: twin})
            return None
        return claimed

    def claim(self, limit: int = 1, accept: Callable[[str | None], bool] | None = None) -> list[Trial]:
        """Up to `limit` WAITING trials claimed by this worker, those whose point (run
        hash, or None) `accept` takes. Retries come first: a point given back (a Slurm task
        warned or preempted) resumes its run at once, before a fresh point starts."""
        claimed: list[Trial] = []
        waiting = self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        for trial in sorted(waiting, key=lambda t: RETRY_OF not in t.user_attrs):
            if len(claimed) >= limit:
                break
            if accept is not None and not accept(trial.user_attrs.get(POINT)):
                continue
            won = self._claim(trial._trial_id)
            if won is not None:
                claimed.append(won)
        return claimed

    def ask(self) -> Trial:
        """A new trial the sampler proposes (an Optuna search), claimed by this worker."""
        trial = self.study.ask()
        self._mark_mine(trial._trial_id)
        return trial

    def next_trial(self, budget: int | None = None, stop: Callable[[], str | None] | None = None) -> Trial | None:
        """A claimed trial to run, or None when nothing is left for this worker. `budget`:
        an Optuna search's n_trials (the sampler proposes trials up to it); None for a grid.
        None too once `stop` says why (a Slurm task's warning), also while it waits for others."""
        while True:
            if stop is not None and stop() is not None:
                return None
            looked = time.monotonic()
            self.reap_dead()
            claimed = self.claim()
            if claimed:
                self.set_attr(claimed[0], CLAIM_S, round(time.monotonic() - looked, 4))
                return claimed[0]
            counts = self.counts()
            if budget is not None and counts.done + counts.queued < budget:
                return self.ask()
            if counts.running == 0:
                return None
            # Others are still running: wait, in case their worker dies and the point comes back.
            time.sleep(min(self.heartbeat_s, 5.0))

    # ---- while a trial runs --------------------------------------------------------------------
    def set_attr(self, trial: Trial, key: str, value: Any) -> bool:
        """Record a user attribute of `trial`; False if the trial is finished (reaped meanwhile)."""
        try:
            self.storage.set_trial_user_attr(trial._trial_id, key, value)
        except UpdateFinishedTrialError:
            return False
        return True

    def _beat(self, trials: list[Trial], stop: threading.Event) -> None:
        """Record a heartbeat for each trial every heartbeat_s until `stop`. A trial stops
        beating only when the storage says it is finished; any other error (the database
        briefly unreachable or locked) is retried at the next beat, or the trial's silence
        would get it reaped while it still runs."""
        alive, warned = list(trials), set()
        while alive and not stop.wait(self.heartbeat_s):
            for trial in list(alive):
                try:
                    self._renew(trial)
                except (UpdateFinishedTrialError, LeaseLost):
                    alive.remove(trial)  # finished, or reaped: nothing more to beat for
                except Exception as err:
                    if trial.number not in warned:
                        warned.add(trial.number)
                        cause = database_cause(err)
                        log.warning("trial %d: heartbeat not recorded (%s: %s); retrying every %g s",
                                    trial.number, type(cause).__name__, str(cause).splitlines()[0][:300],
                                    self.heartbeat_s)

    def _renew(self, trial: Trial, wait: bool = False) -> None:
        """Record a heartbeat for `trial` with the time it is sent, renewing its lease from that moment;
        LeaseLost (the lease marked lost) if the storage says the trial is finished: reaped while this
        worker could not reach it. One try, unless `wait`: a heartbeat is worth sending only fresh (the
        beat loop tries again each heartbeat_s), so it does not go through the storage's long retries."""
        lease = self._leases.get(trial._trial_id)
        if lease is not None and lease.lost:
            raise LeaseLost(lease.lost)
        storage = self.storage if wait else getattr(self.storage, "inner", self.storage)
        sent = time.monotonic()
        try:
            storage.set_trial_user_attr(trial._trial_id, HEARTBEAT, self._now(retry=wait))
        except UpdateFinishedTrialError:
            if lease is None:
                raise
            current = self.storage.get_trial(trial._trial_id)
            why = current.user_attrs.get(DIED, f"it is {current.state.name}")
            self._lose(lease, f"trial {trial.number} was taken from this worker ({why})")
        if lease is not None:
            lease.renewed = max(lease.renewed, sent)

    @staticmethod
    def _lose(lease: Lease, why: str) -> NoReturn:
        lease.lost = (f"{why}; its point runs again elsewhere, so this worker stops it and writes nothing more "
                      "to its run")
        raise LeaseLost(lease.lost)

    def check_lease(self, trial: Trial) -> None:
        """Before a write to `trial`'s run: pass if this worker still holds the trial. A lease the storage has
        not renewed for half the grace period is renewed now. While it is younger than the grace period no
        one can have re-queued the trial, so an unreachable storage is waited out only past that: then the
        renewal waits (up to the storage's retry budget) and says whether the trial is still this worker's;
        LeaseLost if it is not, or if the storage stayed away."""
        lease = self._leases.get(trial._trial_id)
        if lease is None:
            return
        if lease.lost:
            raise LeaseLost(lease.lost)
        age = time.monotonic() - lease.renewed
        if age < self.grace_s / 2:
            return
        try:
            self._renew(trial, wait=age >= self.grace_s)
        except LeaseLost:
            raise
        except Exception as err:
            if time.monotonic() - lease.renewed >= self.grace_s:
                self._lose(lease, f"trial {trial.number}: its lease could not be renewed ({type(err).__name__})")
            # else: still within the grace period; the next write tries again

    @contextmanager
    def beating(self, trials: list[Trial]) -> Iterator[None]:
        """Heartbeats (and leases, see check_lease) for `trials` while the block runs."""
        for trial in trials:
            self._leases[trial._trial_id] = Lease()
        stop = threading.Event()
        threading.Thread(target=self._beat, args=(trials, stop), daemon=True, name="vaelab-heartbeat").start()
        try:
            yield
        finally:
            stop.set()
            for trial in trials:
                self._leases.pop(trial._trial_id, None)

    # ---- finishing -----------------------------------------------------------------------------
    def _tell(self, trial: Trial, values: float | None = None, state: TrialState | None = None) -> FrozenTrial:
        """Finish `trial`. Only one outcome is expected besides success: the trial was
        reaped as dead while it ran (a long stall); its point was re-queued, so its record
        stays as it is and one line says so. Any other error propagates."""
        current = self.storage.get_trial(trial._trial_id)
        if not current.state.is_finished():
            try:
                return self.study.tell(trial, values, state=state)
            except (UpdateFinishedTrialError, ValueError):  # ValueError: "Cannot tell a FAIL trial"
                current = self.storage.get_trial(trial._trial_id)
                if not current.state.is_finished():
                    raise
                # else: reaped between the look and the tell
        reason = current.user_attrs.get(DIED, f"it is {current.state.name}")
        log.warning("trial %d finished here but was reaped meanwhile (%s); its point is queued again and "
                    "Optuna keeps the trial as %s", trial.number, reason, current.state.name)
        return current

    def complete(self, trial: Trial, value: float, test_elbo: float | None = None) -> FrozenTrial:
        if test_elbo is not None:
            self.set_attr(trial, TEST_ELBO, test_elbo)
        return self._tell(trial, values=value)

    def prune(self, trial: Trial) -> FrozenTrial:
        return self._tell(trial, state=TrialState.PRUNED)

    def fail(self, trial: Trial, reason: str) -> FrozenTrial:
        self.set_attr(trial, FAILURE, reason[:2000])
        return self._tell(trial, state=TrialState.FAIL)
