"""`vaelab status SPEC`: a study's points by state (Optuna's trial states, with the queue's own record:
who runs a trial and how fresh its heartbeat is, which trial a retry replaces, why points went back),
beside the tasks of the Slurm job arrays submitted for it (vaelab.sweeps.slurm). Reads only: it starts,
claims and creates nothing."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from vaelab.spec import Spec
from vaelab.sweeps.queue import DIED, DUPLICATE, RETRY_OF, WORKER, TrialQueue, is_replaced
from vaelab.sweeps.slurm import recorded_jobs, task_lines
from vaelab.sweeps.storage import STUDIES_DIR, SweepError, open_storage, storage_url, study_dir
from vaelab.tracking import without_credentials

SHOWN = 20  # trials listed per state; the rest are counted
# What the study and Slurm hand back is shown as text: no escape sequence or line break reaches the terminal.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _printable(line: str) -> str:
    return _CONTROL.sub("?", line)


def _store_exists(url: str) -> bool:
    """Whether the RDB at `url` holds Optuna's tables, asked without creating them (opening it would:
    Optuna makes its schema, and SQLite its file, on first use). A store that cannot be asked (a refused
    password) is opened anyway, for open_storage to say why in one line."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except sqlalchemy.exc.ArgumentError:
        return True
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        return database not in ("", ":memory:") and Path(database).is_file()
    engine = sqlalchemy.create_engine(url)
    try:
        return sqlalchemy.inspect(engine).has_table("studies")
    except sqlalchemy.exc.SQLAlchemyError:
        return True
    finally:
        engine.dispose()


def _label(trial: FrozenTrial) -> str:
    return ", ".join(f"{k}={v}" for k, v in trial.params.items()) or "(not yet sampled)"


def _listed(trials: list[FrozenTrial], line) -> list[str]:
    lines = [line(t) for t in trials[:SHOWN]]
    if len(trials) > SHOWN:
        lines.append(f"    ... and {len(trials) - SHOWN} more")
    return lines


def status_lines(spec: Spec, storage: str | None, studies_root: Path = STUDIES_DIR) -> list[str]:
    url = storage_url(spec, storage)
    journal = study_dir(spec.name, studies_root) / "optuna.journal"
    where = without_credentials(url) if url else str(journal)
    if not (journal.is_file() if url is None else _store_exists(url)):
        raise SweepError(f"no study '{spec.name}' in {where}: nothing was swept or submitted yet")
    opened = open_storage(spec, storage, studies_root)
    try:
        study = optuna.load_study(study_name=spec.name, storage=opened)
    except KeyError:
        raise SweepError(f"no study '{spec.name}' in {where}: nothing was swept or submitted yet") from None
    queue = TrialQueue(study, opened)
    trials = queue.trials()
    lines = [f"study '{spec.name}' ({where}): {queue.counts().line()}"]
    for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
        held = [t for t in trials if t.state == state and not is_replaced(t)]
        if held:
            lines.append(f"  {state.name:<9} {len(held)}")
    running = [t for t in trials if t.state == TrialState.RUNNING]
    lines.append(f"  RUNNING   {len(running)}")

    def running_line(trial: FrozenTrial) -> str:
        age = queue.heartbeat_age(trial)
        beat = f"heartbeat {age:.0f} s ago" if age is not None else "no heartbeat yet"
        return f"    trial {trial.number:>4} [{_label(trial)}] on {trial.user_attrs.get(WORKER, '?')}, {beat}"

    lines += _listed(running, running_line)
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    lines.append(f"  WAITING   {len(waiting)}" + (f" ({sum(RETRY_OF in t.user_attrs for t in waiting)} given back or "
                                                   "re-queued, to resume)" if waiting else ""))
    lines += _listed([t for t in waiting if RETRY_OF in t.user_attrs],
                     lambda t: f"    trial {t.number:>4} [{_label(t)}] retries trial {t.user_attrs[RETRY_OF]}")
    replaced = [t for t in trials if is_replaced(t)]
    if replaced:
        why = Counter(str(t.user_attrs.get(DIED) or f"duplicate of trial {t.user_attrs.get(DUPLICATE)}")[:120]
                      for t in replaced)
        lines.append(f"  replaced  {len(replaced)} (FAIL in Optuna; each point runs again in a later trial):")
        lines += [f"    {n} x {reason}" for reason, n in why.most_common(SHOWN)]
    jobs = recorded_jobs(study.user_attrs)
    for job in jobs:
        lines.append(f"Slurm job array {job['job']} (tasks {job['array']}, time {job.get('time') or 'default'}, "
                     f"submitted {job['submitted']}; {job['script']})")
    lines += task_lines([job["job"] for job in jobs])
    return [_printable(line) for line in lines]
