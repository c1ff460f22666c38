"""A sweep on an Optuna study. A grid is enqueued as fixed trials, one per point, each
labelled with the hash of its resolved run; an Optuna search asks its sampler. Any
number of workers (processes, machines) `prepare` the sweep and then `work` on it:
they claim trials from the shared storage (vaelab.sweeps.queue) and run them
(vaelab.sweeps.trials) as MLflow child runs under one parent run per spec of the study:
a spec replaced with --allow-spec-change starts a new parent run, the study's next generation."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, Trial

from vaelab.ops.locks import study_lock
from vaelab.runlog import CONFIG_TAG
from vaelab.search import GridSearch, OptunaSearch, expand_grid
from vaelab.spec import Spec
from vaelab.sweeps.artifacts import artifact_dir
from vaelab.sweeps.fingerprint import base_changed, check_spec, study_spec_hash
from vaelab.sweeps.points import optuna_params, parent_params, search_values
from vaelab.sweeps.queue import MLFLOW_RUN, PARENT_RUN, Counts, TrialQueue, is_replaced
from vaelab.sweeps.samplers import pruner_for, sampler_for
from vaelab.sweeps.storage import STUDIES_DIR, SweepError, open_storage, storage_url, study_dir
from vaelab.sweeps.trials import Stop, TrialRunner
from vaelab.tracking import NOTE_TAG, Tracker
from vaelab.tracking.ui import CONFIG_VIEW, grouped_view_state, ui_base_for, view_link
from vaelab.training import stack_blocker, stack_key

# Study user attribute: the current parent run, the spec hash it was made for and its generation, as JSON.
PARENT_GENERATION = "vaelab.parent_generation"
# Parent run tags (vaelab.report reads them): the study's generation, the spec hash, and the runs of earlier
# generations that are points of this spec too, as comma-separated run ids in tags CARRIED_TAG.0, .1, ...
GENERATION_TAG = "vaelab.sweep.generation"
SPEC_HASH_TAG = "vaelab.spec_hash"
CARRIED_TAG = "vaelab.sweep.carried"
_TAG_ROOM = 7900  # MLflow keeps tag values up to 8000 characters


def carried_tags(run_ids: list[str]) -> dict[str, str]:
    """`run_ids` as few CARRIED_TAG.<n> tags as fit MLflow's tag length."""
    chunks: list[list[str]] = [[]]
    size = 0
    for run_id in run_ids:
        if chunks[-1] and size + 1 + len(run_id) > _TAG_ROOM:
            chunks.append([])
            size = 0
        size += len(run_id) + (1 if chunks[-1] else 0)
        chunks[-1].append(run_id)
    return {f"{CARRIED_TAG}.{n}": ",".join(chunk) for n, chunk in enumerate(chunks) if chunk}


def _in_space(params: dict[str, Any], search: OptunaSearch) -> bool:
    """Whether a trial's values are a point of `search` (its keys, each within its range or choices)."""
    if set(params) != {key for key, _ in search.params}:
        return False
    for key, dist in search.params:
        value = params[key]
        if dist.kind == "categorical":
            if value not in dist.choices:
                return False
        elif not (dist.low is not None and dist.high is not None and dist.low <= value <= dist.high):
            return False
    return True


class Sweep:
    """One spec's sweep over a storage; `prepare` once, then `work` in any number of processes.
    `allow_spec_change`: `prepare` replaces the spec the study was made from instead of
    refusing a spec that differs from it."""

    def __init__(self, spec: Spec, storage_url: str | None = None, tracker: Tracker | None = None,
                 studies_root: Path = STUDIES_DIR, heartbeat_s: float = 10.0, grace_s: float = 60.0,
                 tracking_uri: str | None = None, sampler_seed_offset: int = 0, allow_spec_change: bool = False):
        if spec.search is None:
            raise SweepError(f"{spec.name}: the spec has no search section; use `vaelab train` for one run")
        self.spec, self.search = spec, spec.search
        self.studies_root, self.storage_url = studies_root, storage_url
        self.allow_spec_change = allow_spec_change
        self.storage = open_storage(spec, storage_url, studies_root)  # a bad URL fails before MLflow is touched
        self.tracker = tracker or Tracker(tracking_uri)
        self.points = expand_grid(self.search, spec.base) if isinstance(self.search, GridSearch) else []
        self._points_by_hash = {p.run.hash(): p for p in self.points}
        self.study = optuna.create_study(
            storage=self.storage, study_name=spec.name, load_if_exists=True,
            direction=optuna.study.StudyDirection[self.search.direction.upper()],
            sampler=sampler_for(self.search, sampler_seed_offset), pruner=pruner_for(self.search),
        )
        # A study taken up again (more n_trials, a new session) must not draw its first points again: a sampler
        # seeded as before would repeat the earlier random proposals. The seed moves with the trials it has.
        if isinstance(self.search, OptunaSearch) and (held := len(self.study.get_trials(deepcopy=False))):
            self.study.sampler = sampler_for(self.search, sampler_seed_offset + held)
        self.queue = TrialQueue(self.study, self.storage, heartbeat_s, grace_s,
                                on_reaped=lambda run_id, why: self.tracker.kill_run(run_id, f"worker died: {why}"))
        self.runner = TrialRunner(spec, self.queue, self.tracker, artifact_dir(spec.name, studies_root))
        self.spec_changes: list[str] = []  # what `prepare` found changed (with allow_spec_change)

    # ---- bookkeeping -------------------------------------------------------------------------
    @property
    def total(self) -> int:
        """Trials the spec asks for: its grid points, or an Optuna search's n_trials."""
        return len(self.points) if isinstance(self.search, GridSearch) else self.search.n_trials

    def trials(self) -> list[FrozenTrial]:
        return self.queue.trials()

    def counts(self) -> Counts:
        return self.queue.counts()

    def pending(self, counts: Counts | None = None) -> int:
        """Trials that still have to run, as the queue sees them: running and waiting
        ones, plus those an Optuna search has yet to ask its sampler for."""
        counts = counts or self.counts()
        if isinstance(self.search, GridSearch):
            return counts.queued
        return counts.queued + max(0, self.search.n_trials - counts.done - counts.queued)

    def reap_dead(self) -> int:
        """Fail RUNNING trials whose worker died, close their MLflow runs, re-queue their points."""
        return self.queue.reap_dead()

    # ---- prepare: spec, parent run, dead trials, grid points --------------------------------
    def prepare(self) -> str:
        """Check the spec against the one the study was made from, create (or find) the
        MLflow parent run, re-queue trials of dead workers, enqueue grid points that have
        no trial yet. Safe to call again: that is resume. Returns the parent run id."""
        # Serialised between workers: it reads, then creates the parent run and enqueues
        # missing points, and two workers doing that at once make two of each.
        folder = study_dir(self.spec.name, self.studies_root)
        with study_lock(storage_url(self.spec, self.storage_url), folder, f"vaelab prepare {self.spec.name}"):
            self.spec_changes = check_spec(self.study, self.spec, self.allow_spec_change)
            parent = self._parent_run()
            self.reap_dead()
            if self.points:
                self.queue.enqueue_missing({p.run.hash(): optuna_params(p.values) for p in self.points})
        return parent

    def _parent_run(self) -> str:
        """The parent run of the study's current spec: the one recorded in the study while the spec it
        was made for is still the study's; else a new one, the next generation of the study (the spec
        was replaced with --allow-spec-change), so no earlier spec's runs share a parent with this one's.
        Earlier parent runs are left as they are."""
        attrs = self.study.user_attrs
        parent = attrs.get(PARENT_RUN)
        digest = study_spec_hash(self.spec)
        made_for, generation = self._parent_record(parent, digest)
        if parent and made_for == digest and self.tracker.run_exists(parent):
            self.tracker.set_status(parent, "RUNNING")
            if PARENT_GENERATION not in attrs:  # a study from before generations: now it says
                self._record_parent(parent, digest, generation)
            return parent
        if parent and made_for != digest:
            generation += 1
        parent = self._create_parent(digest, generation)
        self._record_parent(parent, digest, generation)
        self.study.set_user_attr(PARENT_RUN, parent)
        return parent

    def _parent_record(self, parent: str | None, digest: str) -> tuple[str | None, int]:
        """(the spec hash `parent` was made for, or None if unknown; its generation). A study from before
        generations were recorded holds no record: its parent is the current spec's unless the spec was
        replaced just now."""
        record = json.loads(self.study.user_attrs.get(PARENT_GENERATION) or "null")
        if record is None:
            return (None if self.spec_changes else digest), 1
        if record.get("run") != parent:  # the process that made a new parent stopped before recording it
            return None, int(record["generation"])
        return record.get("spec_hash"), int(record["generation"])

    def _record_parent(self, parent: str, digest: str, generation: int) -> None:
        self.study.set_user_attr(PARENT_GENERATION, json.dumps({"run": parent, "spec_hash": digest,
                                                               "generation": generation}))

    def _create_parent(self, digest: str, generation: int) -> str:
        params = parent_params(self.spec, self.total, [p.run for p in self.points])
        experiment_id = self.tracker.describe_experiment(self.spec.name, self.spec.description)
        self.tracker.share_view(self.spec.name, CONFIG_VIEW, grouped_view_state(CONFIG_TAG))
        grouped = view_link(ui_base_for(self.tracker.uri), experiment_id, CONFIG_VIEW)
        note = (f"Sweep of {self.total} runs over {search_values(self.search)}. {self.spec.description} "
                f"Each configuration's seeds as one group, mean and spread in the charts: {grouped}").strip()
        if generation > 1:
            note = (f"Generation {generation} of this study: its spec was replaced (--allow-spec-change); runs of "
                    f"earlier specs are under the earlier parent runs. {note}")
        tags = {"vaelab.sweep": self.search.kind, "optuna.study": self.spec.name, NOTE_TAG: note,
                GENERATION_TAG: generation, SPEC_HASH_TAG: digest, **carried_tags(self._carried_runs())}
        name = f"sweep-{self.spec.name}" + (f"-gen{generation}" if generation > 1 else "")
        return self.tracker.create_parent_run(self.spec.name, name, params, tags)

    def _carried_runs(self) -> list[str]:
        """MLflow runs of trials finished under an earlier spec that are runs of this spec too, which the
        sweep does not run again (the study holds them) and the report counts: a grid trial whose point
        (its resolved run) is one of this spec's, an Optuna trial when only the search changed (its
        metric, n_trials, a range) and its values lie in this spec's space."""
        search = self.search
        same_base = not base_changed(self.spec_changes)

        def carried(trial: FrozenTrial) -> bool:
            point = self.queue.point_of(trial)
            if point is not None:
                return point in self._points_by_hash
            return isinstance(search, OptunaSearch) and same_base and _in_space(trial.params, search)

        return [t.user_attrs[MLFLOW_RUN] for t in self.trials()
                if t.state.is_finished() and not is_replaced(t) and MLFLOW_RUN in t.user_attrs and carried(t)]

    # ---- work: claim and run trials -----------------------------------------------------------
    def _stack_mates(self, first: Trial, room: int) -> list[Trial]:
        """Up to `room` more waiting grid points that can train with `first` as one stack."""
        point = self._points_by_hash.get(self.queue.point_of(first) or "")
        if room <= 0 or point is None or stack_blocker(point.run):
            return []
        key = stack_key(point.run)

        def fits(point_hash: str | None) -> bool:
            mate = self._points_by_hash.get(point_hash or "")
            return mate is not None and stack_key(mate.run) == key

        return self.queue.claim(limit=room, accept=fits)

    def work(self, parent: str, on_trial: Callable[[FrozenTrial], None] | None = None,
             on_epoch: Callable[[Trial, int, dict], None] | None = None, max_trials: int | None = None,
             stop: Stop | None = None, show_progress: bool = False) -> int:
        """Run trials until none is left (or `max_trials`); returns how many this worker ran. Once `stop`
        says why (a Slurm task's warning: vaelab.sweeps.slurm_task), no trial is claimed and the one under
        way stops after its epoch, its point given back (TrialRunner.run_stack). `show_progress`: each run's
        lines (epochs, evaluators), as `vaelab train` says them."""
        ran = 0
        stack = getattr(self.search, "stack", 1)
        budget = None if isinstance(self.search, GridSearch) else self.search.n_trials
        while max_trials is None or ran < max_trials:
            trial = self.queue.next_trial(budget, stop)
            if trial is None:
                break
            room = stack if max_trials is None else min(stack, max_trials - ran)
            group = [trial, *self._stack_mates(trial, room - 1)]
            why = stop() if stop is not None else None
            if why is not None:  # asked while it claimed: the points go back untouched
                for claimed in group:
                    self.queue.give_back(claimed, why)
                break
            # Each trial is told, and on_trial called, as soon as its run is settled.
            if len(group) > 1:
                finished = self.runner.run_stack(group, parent, on_trial, stop, show_progress)
            else:
                epoch_hook = (lambda e, m, t=trial: on_epoch(t, e, m)) if on_epoch else None
                one = self.runner.run(trial, parent, epoch_hook, on_trial, stop, show_progress)
                finished = [one] if one is not None else []  # None: given back (its run was busy)
            ran += len(finished)
        return ran

    def finish(self, parent: str) -> Counts:
        """Close the parent run when every trial is done; returns the counts."""
        counts = self.counts()
        if counts.queued == 0 and counts.done >= self.total:
            self.tracker.set_status(parent, "FINISHED")
        return counts
