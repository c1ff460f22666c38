"""Many workers on one study: every grid point exactly once, nothing lost, no
database-locked errors. The soak test (slow: `make test-slow`) kills workers at
random through 200 trials and counts what was re-queued, duplicated and lost."""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from optuna.trial import TrialState

from tests.test_sweep import BASE, assert_each_point_once, make_sweep, vaelab, write_spec
from vaelab.sweeps.queue import DIED, POINT, WORKER


def test_four_local_workers_run_every_point_exactly_once(tmp_path: Path, mnist_root: Path):
    grid = {"kind": "grid", "params": {"loss.beta": [0.5, 1.0, 2.0], "model.z_dim": [2, 3]}, "seeds": [0, 1]}
    path = write_spec(tmp_path, mnist_root, grid)
    done = vaelab(tmp_path, "sweep", str(path), "--workers", "4", "--no-progress")
    output = done.communicate(timeout=600)[0]
    assert done.returncode == 0, output
    assert "locked" not in output.lower(), output
    sweep = make_sweep(tmp_path, path)
    assert_each_point_once(sweep, tmp_path)
    assert Counter(t.state for t in sweep.trials()) == Counter({TrialState.COMPLETE: 12})
    assert len({t.user_attrs[WORKER] for t in sweep.trials()}) >= 2  # the work was shared


def _running_worker_pids(tmp_path: Path, path: Path) -> list[int]:
    try:
        trials = make_sweep(tmp_path, path).trials()
    except Exception:  # the journal may be mid-write; look again later
        return []
    return [int(t.user_attrs[WORKER].rsplit(":", 1)[1]) for t in trials
            if t.state == TrialState.RUNNING and WORKER in t.user_attrs]


def _wait_for_running_workers(tmp_path: Path, path: Path, command) -> list[int]:
    """Pids of workers holding a RUNNING trial, once there are any (workers take seconds to start)."""
    deadline = time.time() + 120
    while time.time() < deadline and command.poll() is None:
        pids = _running_worker_pids(tmp_path, path)
        if pids:
            return pids
        time.sleep(0.5)
    return []


@pytest.mark.slow
def test_soak_200_trials_over_4_workers_with_random_kills(tmp_path: Path, mnist_root: Path):
    seeds = list(range(20))
    grid = {"kind": "grid", "params": {"loss.beta": [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]},
            "seeds": seeds}
    path = write_spec(tmp_path, mnist_root, grid, train={**BASE["train"], "epochs": 3})
    rng = random.Random(0)
    kills, rounds, started = 0, 0, time.time()
    while rounds < 30:
        rounds += 1
        command = vaelab(tmp_path, "sweep", str(path), "--workers", "4", "--no-progress")
        # Kill three to six workers at random moments while they run trials, then let the round finish.
        for _ in range(rng.randint(3, 6)):
            pids = _wait_for_running_workers(tmp_path, path, command)
            if not pids:
                break
            time.sleep(rng.uniform(0.0, 5.0))
            try:
                os.kill(rng.choice(pids), signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass
        output = command.communicate(timeout=1200)[0]
        assert "locked" not in output.lower(), output
        assert command.returncode == 0, output
        if "already complete" in output:
            break
    sweep = make_sweep(tmp_path, path)
    trials = sweep.trials()
    complete = Counter(t.user_attrs[POINT] for t in trials if t.state == TrialState.COMPLETE)
    requeued = sum(DIED in t.user_attrs for t in trials)
    duplicated = sum(n - 1 for n in complete.values())
    lost = len({p.run.hash() for p in sweep.points} - set(complete))
    print(f"\nsoak: {len(sweep.points)} points, {kills} workers killed over {rounds} rounds in "
          f"{time.time() - started:.0f} s: {len(complete)} finished, {requeued} re-queued, "
          f"{duplicated} duplicated, {lost} lost")
    assert duplicated == 0 and lost == 0 and len(complete) == 200
    assert_each_point_once(sweep, tmp_path)
