"""A study remembers the resolved spec it was made from: an invocation with another
spec (a `--set`, an edited file) is refused in one line instead of mixing its runs
into the study, unless --allow-spec-change says so. Real tiny sweeps through the CLI."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

from optuna.trial import TrialState

from tests.test_sweep import GRID, child_runs, make_sweep, write_spec
from vaelab.spec import load_spec
from vaelab.sweeps.fingerprint import differences, spec_hash, spec_record


def finished_runs(tmp_path: Path) -> list:
    children, _ = child_runs(tmp_path, "sweep_demo")
    return [r for r in children if r.info.status == "FINISHED"]


def finished_study(tmp_path: Path, mnist_root: Path, sweep_cli) -> Path:
    path = write_spec(tmp_path, mnist_root, GRID)
    code, out, err = sweep_cli("sweep", str(path), "--no-progress")
    assert code == 0, err
    assert "4 complete" in out
    return path


def test_changed_spec_is_refused_in_one_line_and_runs_nothing(tmp_path: Path, mnist_root: Path, sweep_cli):
    path = finished_study(tmp_path, mnist_root, sweep_cli)

    code, out, err = sweep_cli("sweep", str(path), "--no-progress", "--set", "train.epochs=3")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("vaelab: error: "), err
    assert "train.epochs 2 -> 3" in err and "--allow-spec-change" in err and "name:" in err, err
    assert "loss.beta" not in err  # only what differs is named
    assert len(make_sweep(tmp_path, path).trials()) == 4  # nothing enqueued

    code, out, err = sweep_cli("worker", str(path), "--set", "train.epochs=3")
    assert code == 2 and "train.epochs 2 -> 3" in err
    code, out, err = sweep_cli("sweep", str(path), "--no-progress")
    assert code == 0, err
    assert "already complete" in out

    trials = make_sweep(tmp_path, path).trials()
    assert Counter(t.state for t in trials) == Counter({TrialState.COMPLETE: 4})
    hashes = Counter(r.data.tags["vaelab.run_hash"] for r in finished_runs(tmp_path))
    assert len(hashes) == 4 and set(hashes.values()) == {1}  # no point ran twice


def test_allow_spec_change_runs_the_new_points_and_remembers_the_new_spec(tmp_path: Path, mnist_root: Path,
                                                                          sweep_cli):
    path = finished_study(tmp_path, mnist_root, sweep_cli)

    # With a progress bar: it counts the 4 new points still to run, so it starts at 4/8, not 4/4 (100%).
    code, out, err = sweep_cli("sweep", str(path), "--set", "train.epochs=3", "--allow-spec-change")
    assert code == 0, err
    assert "spec is replaced" in out and "train.epochs 2 -> 3" in out
    assert "4/8" in err and "8/8" in err and "4/4" not in err, err
    trials = make_sweep(tmp_path, path).trials()
    assert Counter(t.state for t in trials) == Counter({TrialState.COMPLETE: 8})
    finished = finished_runs(tmp_path)
    assert Counter(r.data.params["train.epochs"] for r in finished) == Counter({"2": 4, "3": 4})
    assert len({r.data.tags["vaelab.run_hash"] for r in finished}) == 8

    # The study now holds the new spec: the old one is the changed one.
    code, out, err = sweep_cli("sweep", str(path), "--no-progress")
    assert code == 2 and "train.epochs 3 -> 2" in err, err
    code, out, err = sweep_cli("sweep", str(path), "--no-progress", "--set", "train.epochs=3")
    assert code == 0 and "already complete" in out, err


def test_spec_record_names_keys_and_ignores_where_the_study_lives(tmp_path: Path, mnist_root: Path):
    spec = load_spec(write_spec(tmp_path, mnist_root, GRID))
    record = spec_record(spec)
    assert record["train.epochs"] == 2 and record["search.params.loss.beta"] == [0.5, 2.0]
    assert record["search.seeds"] == [0, 1] and "search.storage" not in record
    moved = dataclasses.replace(spec, search=dataclasses.replace(spec.search, storage="sqlite:///elsewhere.db"))
    assert spec_hash(spec_record(moved), type(spec.search)) == spec_hash(record, type(spec.search))
    wider = dataclasses.replace(spec, search=dataclasses.replace(spec.search, seeds=(0, 1, 2)))
    assert differences(record, spec_record(wider), type(spec.search)) == ["search.seeds [0, 1] -> [0, 1, 2]"]
    # A key an older record lacks counts as its default (a field added in a later version).
    older = {k: v for k, v in record.items() if k not in ("data.val_fraction", "search.stack")}
    assert differences(older, record, type(spec.search)) == []
    assert spec_hash(older, type(spec.search)) == spec_hash(record, type(spec.search))
