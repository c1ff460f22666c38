"""Sweeps on Optuna: the only module that imports optuna.

Both kinds run on an Optuna study. A grid is enqueued as fixed trials, one per
point, each labelled with the hash of its resolved run; an Optuna search asks
its sampler. Any number of workers (processes, machines) claim trials from the
shared storage, and each claimed trial goes to the same `runner.run` that
`vaelab train` uses, as an MLflow child run under one parent run per sweep.

Exactly once: a worker claims a WAITING trial atomically (the storage refuses a
second claim), and a claimed grid trial that has an older live twin (two
processes enqueued the same point at once) steps aside. Resume: trials whose
worker died (its pid is gone on this host, or its heartbeat is older than the
grace period) are failed, their MLflow run is marked KILLED, and their point is
enqueued again; finished trials are never re-run.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import socket
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import sqlalchemy.exc
import sqlalchemy.pool
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, Trial, TrialState

from vaelab.runner import run as run_one
from vaelab.runner import run_stack
from vaelab.search import GridSearch, OptunaSearch, Point, expand_grid
from vaelab.spec import Spec, flatten, with_values
from vaelab.stacked import stack_blocker, stack_key
from vaelab.tracking import Tracker, without_credentials
from vaelab.train import RunPruned

optuna.logging.set_verbosity(optuna.logging.WARNING)

STUDIES_DIR = Path("studies")
# Trial user attributes (the sweep's own bookkeeping, visible in Optuna's dashboard too).
POINT, WORKER, HEARTBEAT, MLFLOW_RUN = "grid_point", "worker", "heartbeat", "mlflow_run_id"
FAILURE, DIED, DUPLICATE = "failure_reason", "worker_died", "duplicate_of"
PARENT_RUN = "mlflow_parent_run_id"


class SweepError(ValueError):
    """A sweep cannot start (bad storage URL, no search section, ...)."""


def study_dir(name: str, root: Path = STUDIES_DIR) -> Path:
    folder = (root / name).resolve()
    if folder.parent != root.resolve():  # names are validated; this is the last line of defence
        raise SweepError(f"study name {name!r} escapes {root}/")
    return folder


def open_storage(spec: Spec, url: str | None, root: Path = STUDIES_DIR):
    """`url` (or search.storage) as an Optuna RDB URL, else a journal file under
    studies/<name>/ that several local processes can share (SQLite cannot)."""
    url = url or spec.search.storage
    if url:
        if url.split(":", 1)[0].split("+", 1)[0] not in ("postgresql", "mysql", "sqlite"):
            raise SweepError(f"--storage: expected an RDB URL (postgresql://, mysql://, sqlite:///), "
                             f"got {without_credentials(url)!r}")
        return _open_rdb(url)
    folder = study_dir(spec.name, root)
    folder.mkdir(parents=True, exist_ok=True)
    path = str(folder / "optuna.journal")
    return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))


def _open_rdb(url: str, attempts: int = 8) -> RDBStorage:
    """Optuna creates its tables on first use; workers that start together on an empty
    database race to create them, and the losers get a unique violation (PostgreSQL's
    DDL takes no lock on a table that does not exist yet). The winner has committed by
    then, so a loser that tries again finds the tables."""
    for attempt in range(attempts):
        try:
            return RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except sqlalchemy.exc.IntegrityError as err:
            if attempt == attempts - 1:
                raise SweepError(f"--storage {without_credentials(url)}: cannot create Optuna's tables "
                                 f"({_first_line(err)})") from None
            time.sleep(random.uniform(0.05, 0.3) * (attempt + 1))
        except Exception as err:
            raise SweepError(f"--storage {without_credentials(url)}: cannot connect ({_first_line(err)})") from None
    raise AssertionError("unreachable")


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


@contextmanager
def database_lock(url: str, name: str):
    """A lock that lives in the study's database, so workers on different machines
    take turns: a PostgreSQL advisory lock or MySQL's GET_LOCK on a connection of its
    own (the server drops it if the worker dies), or a lock file beside a SQLite file."""
    address = sqlalchemy.engine.make_url(url)
    if address.get_backend_name() == "sqlite":
        if not address.database or address.database == ":memory:":
            yield
            return
        with open(f"{address.database}.vaelab-lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield
        return
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    engine = sqlalchemy.create_engine(address, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            if address.get_backend_name() == "postgresql":
                key = int.from_bytes(digest, "big", signed=True)
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
                connection.commit()
                yield
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            else:  # mysql: lock names are at most 64 characters
                key = f"vaelab-{digest.hex()}"
                connection.execute(sqlalchemy.text("SELECT GET_LOCK(:key, -1)"), {"key": key})
                yield
                connection.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:key)"), {"key": key})
            connection.commit()
    finally:
        engine.dispose()


def _sampler(search: OptunaSearch | GridSearch, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    if isinstance(search, GridSearch):
        return optuna.samplers.RandomSampler(seed=0)  # never consulted: every grid trial is enqueued
    # Workers that share a study need different seeds, or they propose the same points.
    seed = (search.seed + seed_offset) % 2**32
    return {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed),
    }[search.sampler]()


def _pruner(search: OptunaSearch | GridSearch) -> optuna.pruners.BasePruner:
    name = search.pruner if isinstance(search, OptunaSearch) else "none"
    return {
        "none": optuna.pruners.NopPruner,
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
        "hyperband": optuna.pruners.HyperbandPruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    }[name]()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


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

    def line(self) -> str:
        text = (f"{self.complete} complete, {self.pruned} pruned, {self.failed} failed, "
                f"{self.running} running, {self.waiting} waiting")
        if self.replaced:
            text += f" ({self.replaced} re-queued after a dead worker)"
        return text


def _is_replaced(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.FAIL and (DIED in trial.user_attrs or DUPLICATE in trial.user_attrs)


def _holds_point(trial: FrozenTrial) -> bool:
    """A trial that has run, runs, or will run its point (so the point needs no new trial)."""
    return not _is_replaced(trial)


class Sweep:
    """One spec's sweep over a storage; `prepare` once, then `work` in any number of processes."""

    def __init__(self, spec: Spec, storage_url: str | None = None, tracker: Tracker | None = None,
                 studies_root: Path = STUDIES_DIR, heartbeat_s: float = 10.0, grace_s: float = 60.0,
                 tracking_uri: str | None = None, sampler_seed_offset: int = 0):
        if spec.search is None:
            raise SweepError(f"{spec.name}: the spec has no search section; use `vaelab train` for one run")
        self.spec = spec
        self.search = spec.search
        self.studies_root = studies_root
        self.storage_url = storage_url
        self.storage = open_storage(spec, storage_url, studies_root)  # a bad URL fails before MLflow is touched
        self.tracker = tracker or Tracker(tracking_uri)
        self.heartbeat_s, self.grace_s = heartbeat_s, grace_s
        self.points = expand_grid(self.search, spec.base) if isinstance(self.search, GridSearch) else []
        self._points_by_hash = {p.run.hash(): p for p in self.points}
        self.study = optuna.create_study(
            storage=self.storage, study_name=spec.name, load_if_exists=True,
            direction=self.search.direction, sampler=_sampler(self.search, sampler_seed_offset),
            pruner=_pruner(self.search),
        )
        self._study_id = self.storage.get_study_id_from_name(spec.name)

    # ---- bookkeeping -------------------------------------------------------------------------
    @property
    def total(self) -> int:
        return len(self.points) if self.points else self.search.n_trials

    def trials(self) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False)

    def counts(self) -> Counts:
        counts = Counts()
        for trial in self.trials():
            if _is_replaced(trial):
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

    @contextmanager
    def _prepare_lock(self):
        """Serialise `prepare` between workers: it reads, then creates the parent run and
        enqueues missing points, and two workers doing that at once make two of each."""
        url = self.storage_url or self.search.storage
        if url:
            with database_lock(url, f"vaelab prepare {self.spec.name}"):
                yield
            return
        # The journal's own lock guards each write, not our read-then-enqueue.
        folder = study_dir(self.spec.name, self.studies_root)
        with open(folder / "prepare.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # ---- prepare: parent run, dead trials, grid points --------------------------------------
    def prepare(self) -> str:
        """Create (or find) the MLflow parent run, re-queue trials of dead workers,
        enqueue grid points that have no trial yet. Safe to call again: that is resume."""
        with self._prepare_lock():
            parent = self._parent_run()
            self.reap_dead()
            if self.points:
                self._enqueue_missing_points()
        return parent

    def _parent_run(self) -> str:
        parent = self.study.user_attrs.get(PARENT_RUN)
        if parent and self.tracker.run_exists(parent):
            self.tracker.set_status(parent, "RUNNING")
            return parent
        params = {f"base.{k}": v for k, v in flatten(self.spec.base).items()}
        params.update({"search.kind": self.search.kind, "search.total": self.total,
                       "search.metric": self.search.metric, "search.direction": self.search.direction,
                       "search.params": ", ".join(k for k, _ in self.search.params)})
        parent = self.tracker.create_parent_run(self.spec.name, f"sweep-{self.spec.name}", params,
                                                {"vaelab.sweep": self.search.kind, "optuna.study": self.spec.name})
        self.study.set_user_attr(PARENT_RUN, parent)
        return parent

    def _enqueue_missing_points(self) -> int:
        held = {t.user_attrs.get(POINT) for t in self.trials() if _holds_point(t)}
        added = 0
        for point in self.points:
            key = point.run.hash()
            if key not in held:
                self.study.enqueue_trial(_as_optuna_params(point.values), user_attrs={POINT: key})
                held.add(key)
                added += 1
        return added

    def _is_dead(self, trial: FrozenTrial, now: float) -> str | None:
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

    def reap_dead(self) -> int:
        """Fail RUNNING trials whose worker died, close their MLflow runs, re-queue their points."""
        now, reaped = time.time(), 0
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            reason = self._is_dead(trial, now)
            if reason is None:
                continue
            reaped += self._fail_and_requeue(trial, reason)
        return reaped

    def _fail_and_requeue(self, trial: FrozenTrial, reason: str) -> int:
        trial_id = trial._trial_id
        try:
            self.storage.set_trial_user_attr(trial_id, DIED, reason)
            self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except Exception:
            return 0  # finished meanwhile, or another process reaped it first
        if MLFLOW_RUN in trial.user_attrs:
            self.tracker.kill_run(trial.user_attrs[MLFLOW_RUN], f"worker died: {reason}")
        attrs = {k: v for k, v in trial.user_attrs.items() if k == POINT}
        self.study.enqueue_trial(dict(trial.params) or trial.system_attrs.get("fixed_params", {}),
                                 user_attrs={**attrs, "retry_of": trial.number})
        return 1

    # ---- work: claim and run trials -----------------------------------------------------------
    def _mark_mine(self, trial_id: int) -> None:
        self.storage.set_trial_user_attr(trial_id, WORKER, worker_id())
        self.storage.set_trial_user_attr(trial_id, HEARTBEAT, time.time())

    def _claim(self, trial_id: int) -> Trial | None:
        """Trial `trial_id` if this worker won it from WAITING and it is not the younger
        twin of a point another trial holds (that one is failed as a duplicate); else None."""
        if not self.storage.set_trial_state_values(trial_id, TrialState.RUNNING):
            return None
        self._mark_mine(trial_id)
        claimed = Trial(self.study, trial_id)
        twin = self._older_twin(claimed)
        if twin is not None:
            self.storage.set_trial_user_attr(trial_id, DUPLICATE, twin)
            self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
            return None
        return claimed

    def _claim_waiting(self) -> Trial | None:
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            claimed = self._claim(trial._trial_id)
            if claimed is not None:
                return claimed
        return None

    def _claim_stack_mates(self, first: Trial, size: int) -> list[Trial]:
        """`first` and up to size - 1 more waiting grid points that can train with it as one stack."""
        point = self._points_by_hash.get(first.user_attrs.get(POINT))
        if size <= 1 or point is None or stack_blocker(point.run):
            return [first]
        key, group = stack_key(point.run), [first]
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            if len(group) >= size:
                break
            mate = self._points_by_hash.get(trial.user_attrs.get(POINT))
            if mate is None or stack_key(mate.run) != key:
                continue
            claimed = self._claim(trial._trial_id)
            if claimed is not None:
                group.append(claimed)
        return group

    def _older_twin(self, trial: Trial) -> int | None:
        key = trial.user_attrs.get(POINT)
        if key is None:
            return None
        for other in self.trials():
            if other.number < trial.number and other.user_attrs.get(POINT) == key and _holds_point(other):
                return other.number
        return None

    def _next_trial(self) -> Trial | None:
        """A claimed trial to run, or None when nothing is left for this worker."""
        while True:
            self.reap_dead()
            trial = self._claim_waiting()
            if trial is not None:
                return trial
            counts = self.counts()
            if not self.points and counts.done + counts.running + counts.waiting < self.total:
                trial = self.study.ask()  # an Optuna search: the sampler proposes the next point
                self._mark_mine(trial._trial_id)
                return trial
            if counts.running == 0:
                return None
            # Others are still running: wait, in case their worker dies and the point comes back.
            time.sleep(min(self.heartbeat_s, 5.0))

    def _suggest(self, trial: Trial) -> dict[str, Any]:
        values: dict[str, Any] = {}
        if isinstance(self.search, GridSearch):
            for key, options in self.search.params:
                values[key] = _suggest_grid(trial, key, options)
            values["train.seed"] = trial.suggest_categorical("train.seed", list(self.search.seeds))
            return values
        for key, dist in self.search.params:
            if dist.kind == "categorical":
                values[key] = trial.suggest_categorical(key, list(dist.choices))
            elif dist.kind == "int":
                values[key] = trial.suggest_int(key, dist.low, dist.high, step=dist.step or 1, log=dist.log)
            else:
                values[key] = trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)
        return values

    def _heartbeat(self, trials: list[Trial], stop: threading.Event) -> None:
        alive = list(trials)
        while alive and not stop.wait(self.heartbeat_s):
            for trial in list(alive):
                try:
                    self.storage.set_trial_user_attr(trial._trial_id, HEARTBEAT, time.time())
                except Exception:
                    alive.remove(trial)  # finished or reaped; nothing more to beat for

    @contextmanager
    def _beating(self, trials: list[Trial]):
        stop = threading.Event()
        threading.Thread(target=self._heartbeat, args=(trials, stop), daemon=True).start()
        try:
            yield
        finally:
            stop.set()

    def _point(self, trial: Trial) -> Point:
        values = self._suggest(trial)
        return Point(values=values, run=with_values(self.spec.base, values))

    def _tags(self, trial: Trial, point: Point, parent: str) -> dict[str, Any]:
        return {"mlflow.parentRunId": parent, "optuna.study": self.spec.name, "optuna.trial_number": trial.number,
                "vaelab.sweep_point": point.label}

    def _fail(self, trial: Trial, err: BaseException) -> FrozenTrial:
        self.storage.set_trial_user_attr(trial._trial_id, FAILURE, f"{type(err).__name__}: {err}"[:2000])
        return self._tell(trial, state=TrialState.FAIL)

    def run_stacked_trials(self, trials: list[Trial], parent: str) -> list[FrozenTrial]:
        """Grid trials that share a stack key, trained as one stacked model, each
        with its own MLflow child run; a run that fails fails its trial alone."""
        points = [self._point(t) for t in trials]
        on_start = [lambda run_id, t=t: self.storage.set_trial_user_attr(t._trial_id, MLFLOW_RUN, run_id)
                    for t in trials]
        with self._beating(trials):
            try:
                outcomes = run_stack([p.run for p in points], self.spec.name, self.tracker, show_progress=False,
                                     extra_tags=[self._tags(t, p, parent) for t, p in zip(trials, points, strict=True)],
                                     names=[_child_run_name(t.number, p.values) for t, p in zip(trials, points,
                                                                                             strict=True)],
                                     on_start=on_start)
            except KeyboardInterrupt:
                for trial in trials:
                    self._fail_and_requeue(self.storage.get_trial(trial._trial_id), "interrupted (Ctrl-C)")
                raise
            except Exception as err:  # the whole stack failed (bad data, out of memory): each trial says why
                return [self._fail(t, err) for t in trials]
        frozen = []
        for trial, outcome in zip(trials, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                frozen.append(self._fail(trial, outcome))
                continue
            self.storage.set_trial_user_attr(trial._trial_id, "test_elbo", outcome.metrics["test/elbo"])
            frozen.append(self._tell(trial, values=outcome.best(self.search.metric)))
        return frozen

    def run_trial(self, trial: Trial, parent: str, on_epoch: Callable[[int, dict], None] | None = None) -> FrozenTrial:
        point = self._point(trial)
        metric = self.search.metric

        def report(epoch: int, metrics: dict[str, float]) -> None:
            if on_epoch is not None:
                on_epoch(epoch, metrics)
            if isinstance(self.search, OptunaSearch) and self.search.pruner != "none":
                trial.report(metrics[metric], epoch)
                if trial.should_prune():
                    raise RunPruned(f"pruned by the {self.search.pruner} pruner at epoch {epoch}")

        with self._beating([trial]):
            try:
                outcome = run_one(point.run, self.spec.name, self.tracker, show_progress=False,
                                  extra_tags=self._tags(trial, point, parent),
                                  name=_child_run_name(trial.number, point.values), epoch_callbacks=[report],
                                  on_start=lambda run_id: self.storage.set_trial_user_attr(trial._trial_id,
                                                                                             MLFLOW_RUN, run_id))
            except RunPruned:
                return self._tell(trial, state=TrialState.PRUNED)
            except KeyboardInterrupt:
                # Ctrl-C: give the point back so the next `vaelab sweep` runs it again.
                self._fail_and_requeue(self.storage.get_trial(trial._trial_id), "interrupted (Ctrl-C)")
                raise
            except Exception as err:  # a bad run (NaN, bad shape) fails alone; the sweep goes on
                return self._fail(trial, err)
        self.storage.set_trial_user_attr(trial._trial_id, "test_elbo", outcome.metrics["test/elbo"])
        return self._tell(trial, values=outcome.best(metric))

    def _tell(self, trial: Trial, values: float | None = None, state: TrialState | None = None) -> FrozenTrial:
        try:
            return self.study.tell(trial, values, state=state)
        except Exception:
            # Reaped as dead while it ran (a long stall): its point was re-queued; keep the record as is.
            return self.storage.get_trial(trial._trial_id)

    def work(self, parent: str, on_trial: Callable[[FrozenTrial], None] | None = None,
             on_epoch: Callable[[Trial, int, dict], None] | None = None, max_trials: int | None = None) -> int:
        """Run trials until none is left (or `max_trials`); returns how many this worker ran."""
        ran = 0
        stack = getattr(self.search, "stack", 1)
        while max_trials is None or ran < max_trials:
            trial = self._next_trial()
            if trial is None:
                break
            room = stack if max_trials is None else min(stack, max_trials - ran)
            group = self._claim_stack_mates(trial, room)
            if len(group) > 1:
                finished = self.run_stacked_trials(group, parent)
            else:
                epoch_hook = (lambda e, m, t=trial: on_epoch(t, e, m)) if on_epoch else None
                finished = [self.run_trial(trial, parent, epoch_hook)]
            ran += len(finished)
            for frozen in finished:
                if on_trial is not None:
                    on_trial(frozen)
        return ran

    def finish(self, parent: str) -> Counts:
        """Close the parent run when every trial is done; returns the counts."""
        counts = self.counts()
        if counts.running == 0 and counts.waiting == 0 and counts.done >= self.total:
            self.tracker.set_status(parent, "FINISHED")
        return counts


def _child_run_name(number: int, values: dict[str, Any]) -> str:
    """e.g. `trial-3 beta=2 hidden=[64,32] seed=1`: readable in the MLflow run list."""
    parts = [f"{key.rsplit('.', 1)[-1]}={value}".replace(" ", "") for key, value in values.items()]
    return " ".join([f"trial-{number}", *parts])[:200]


def _as_optuna_params(values: dict[str, Any]) -> dict[str, Any]:
    return {k: str(list(v)) if isinstance(v, (list, tuple)) else v for k, v in values.items()}


def _suggest_grid(trial: Trial, key: str, options: tuple[Any, ...]) -> Any:
    """The enqueued value of a grid key. List values (model.hidden) travel as
    their repr, since Optuna's categorical choices must be scalars."""
    if options and isinstance(options[0], tuple):
        chosen = trial.suggest_categorical(key, [str(list(o)) for o in options])
        return next(list(o) for o in options if str(list(o)) == chosen)
    return trial.suggest_categorical(key, list(options))



def optuna_report_section(spec: Spec, storage_url: str | None, folder: Path,
                          studies_root: Path = STUDIES_DIR) -> list[str]:
    """Markdown lines for an Optuna search's report: the best trials, the optimisation
    history and the parameter importances (Optuna's matplotlib plots). Reads only."""
    if not isinstance(spec.search, OptunaSearch):
        return []
    journal = study_dir(spec.name, studies_root) / "optuna.journal"
    if not (storage_url or spec.search.storage) and not journal.exists():
        return ["", "## Optuna study", "", f"(no Optuna storage found at {journal})"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    from optuna.visualization import matplotlib as optuna_plots

    study = optuna.load_study(study_name=spec.name, storage=open_storage(spec, storage_url, studies_root))
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    lines = ["", "## Optuna study", ""]
    if not complete:
        return lines + ["No complete trials yet."]
    reverse = spec.search.direction == "maximize"
    best = sorted(complete, key=lambda t: t.value, reverse=reverse)[:5]

    rows = [{"trial": t.number, spec.search.metric: round(t.value, 4), **t.params} for t in best]
    lines += [f"Best trials by {spec.search.metric} ({spec.search.direction}):", "",
              pd.DataFrame(rows).to_markdown(index=False), ""]
    plots = [("optuna_history.png", optuna_plots.plot_optimization_history)]
    if len(complete) >= 2 and len(spec.search.params) >= 2:
        plots.append(("optuna_importances.png", optuna_plots.plot_param_importances))
    for name, plot in plots:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            try:
                axes = plot(study)
            except (ValueError, RuntimeError) as err:
                lines.append(f"({name}: {err})")
                continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.set_size_inches(7, 4.5)
        figure.tight_layout()
        figure.savefig(folder / name, dpi=100)
        plt.close(figure)
        lines.append(f"![{name[:-4]}](figures/{name})")
    return lines
