"""search.evaluate: when a sweep is done, its top runs are evaluated again with the
spec's settings (vaelab evaluate), exactly once each: workers take turns under the
study's lock, and each run evaluated is recorded in the study (user attribute
vaelab.final_eval.<run id>) only after its metrics are logged, so a kill mid-way
leaves the rest to the next invocation and repeats nothing."""

from __future__ import annotations

import logging
from collections.abc import Callable

from vaelab.evaluation.later import EvaluatedRun, evaluate_finished
from vaelab.evaluation.stage import select
from vaelab.ops.locks import study_lock
from vaelab.sweeps.storage import storage_url, study_dir

DONE_PREFIX = "vaelab.final_eval."
log = logging.getLogger(__name__)


def final_evaluation(sweep, parent: str, show_progress: bool = False,
                     on_run: Callable[[EvaluatedRun], None] | None = None) -> list[EvaluatedRun]:
    """Evaluate the top runs of a finished sweep that are not evaluated yet; [] when the
    spec asks for none or trials are still to run."""
    final = sweep.search.evaluate
    if final is None or sweep.pending() > 0:
        return []
    folder = study_dir(sweep.spec.name, sweep.studies_root)
    done: list[EvaluatedRun] = []
    with study_lock(storage_url(sweep.spec, sweep.storage_url), folder, f"vaelab final-evaluation {sweep.spec.name}"):
        maximize = sweep.search.direction == "maximize" and final.by == sweep.search.metric
        top = sweep.tracker.best_runs(sweep.spec.name, f"best/{final.by}", ascending=not maximize, n=final.top,
                                      parent=parent)
        label = final.label()
        attrs = sweep.study.user_attrs
        for run_id in top:
            if attrs.get(DONE_PREFIX + run_id) == label:
                continue
            try:
                evaluated = evaluate_finished(run_id, sweep.tracker, list(final.overrides), select(None),
                                              show_progress=show_progress)
            except Exception as err:  # this run cannot be evaluated (no checkpoint, ...): the others still are
                log.warning("final evaluation of run %s failed: %s: %s", run_id, type(err).__name__, err)
                continue
            sweep.study.set_user_attr(DONE_PREFIX + run_id, label)
            done.append(evaluated)
            if on_run is not None:
                on_run(evaluated)
    return done
