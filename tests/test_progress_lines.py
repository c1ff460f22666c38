"""Progress that reads in a log: where stderr is a file (Slurm, `2> log`) or `--no-progress` is given,
`vaelab train` writes one plain line per epoch and per evaluator and no `\\r` redraws; a terminal
still gets tqdm's bars; early stopping is said in one line. Real `vaelab train` processes."""

from __future__ import annotations

import io
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, make_idx_folder
from vaelab import progress

EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+): train/loss=[\d.]+, val/loss=[\d.]+ \([\d.]+ (s|min)\)$")


def write_spec(folder: Path, root: Path, **train) -> Path:
    spec = {"name": "lines_demo", "base": {
        "data": {"dataset": "mnist", "root": str(root), "download": False},
        "model": {"z_dim": 2, "hidden": [16]},
        "train": {"epochs": 3, "batch_size": 32, "patience": None, "device": "cpu", **train},
        "eval": {"figures": False, "iw_samples": 5, "probe": False},
    }}
    path = folder / "lines_demo.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def train_into_a_log(folder: Path, spec: Path, *flags: str) -> str:
    """`vaelab train SPEC --no-track` with stdout and stderr going to one file, as under Slurm."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO)
    log = folder / "train.log"
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "vaelab", "train", str(spec), "--no-track", "--out",
                               str(folder / "untracked"), *flags], cwd=folder, env=env, stdout=out,
                              stderr=subprocess.STDOUT, timeout=300)
    text = log.read_text()
    assert done.returncode == 0, text
    return text


@pytest.fixture(scope="module")
def idx_root(tmp_path_factory) -> Path:
    return make_idx_folder(tmp_path_factory.mktemp("idx") / "mnist")


@pytest.mark.parametrize("flags", [(), ("--no-progress",)], ids=["log file", "--no-progress"])
def test_a_log_gets_one_line_per_epoch_and_evaluator_and_no_carriage_return(tmp_path: Path, idx_root: Path,
                                                                          flags: tuple[str, ...]):
    text = train_into_a_log(tmp_path, write_spec(tmp_path, idx_root), *flags)
    assert "\r" not in text
    epochs = [int(m.group(1)) for line in text.splitlines() if (m := EPOCH_LINE.match(line))]
    assert epochs == [1, 2, 3], text
    assert len([line for line in text.splitlines() if line.startswith("epoch ")]) == 3  # nothing per batch
    for evaluator in ("elbo", "latents", "iwae"):
        assert len([line for line in text.splitlines() if line.startswith(f"eval {evaluator}")
                    and " done in " in line]) == 1, text
    assert "figures and checkpoint: done in" in text
    assert "FINISHED" in text


def test_early_stopping_is_said_in_one_line(tmp_path: Path, idx_root: Path):
    # 216 training images at a high rate: validation stops improving within a few epochs.
    text = train_into_a_log(tmp_path, write_spec(tmp_path, idx_root, epochs=30, patience=1, lr=1e-2), "--no-progress")
    said = [line for line in text.splitlines() if line.startswith("early stopping")]
    assert len(said) == 1, text
    stopped = int(re.match(r"early stopping after epoch (\d+): ", said[0]).group(1))
    assert "train.patience 1" in said[0] and "keeping epoch" in said[0]
    epochs = [int(m.group(1)) for line in text.splitlines() if (m := EPOCH_LINE.match(line))]
    assert epochs == list(range(1, stopped + 1)) and stopped < 30


def test_a_sweep_in_a_log_says_each_trial_with_its_count_and_no_carriage_return(tmp_path: Path, mnist_root: Path,
                                                                                 sweep_cli):
    from tests.test_sweep import write_spec as write_study

    path = write_study(tmp_path, mnist_root, {"kind": "grid", "params": {"loss.beta": [0.5, 2.0]}, "seeds": [0]})
    code, out, err = sweep_cli("sweep", str(path))
    assert code == 0, err
    assert "\r" not in out + err
    trials = [line for line in out.splitlines() if line.startswith("trial ")]
    assert [line.rsplit("  ", 1)[1] for line in trials] == ["[1/2 done]", "[2/2 done]"], out
    assert "sweep_demo: 0/2 trials done, 2 to run" in err and "sweep_demo: 2/2 done in " in err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_bars_unless_they_are_turned_off(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    try:
        progress.use_bars(True)
        with progress.bar(4, "epoch 1/1", "batch") as bar:
            for _ in range(4):
                bar.update(1)
        assert "\r" in terminal.getvalue() and "epoch 1/1" in terminal.getvalue()  # tqdm's bar, redrawn

        drawn = len(terminal.getvalue())
        progress.use_bars(False)  # --no-progress
        with progress.bar(4, "epoch 1/1", "batch") as bar:
            bar.update(4)
            bar.set_postfix({"val/loss": "1.00"})
        assert terminal.getvalue()[drawn:].startswith("epoch 1/1: val/loss=1.00 (")
        assert "\r" not in terminal.getvalue()[drawn:]
    finally:
        progress.use_bars(True)


def test_nothing_is_said_without_progress_and_no_line_for_work_cut_short(capsys):
    with progress.bar(3, "quiet", show=False) as bar:
        bar.update(3)
    with pytest.raises(KeyboardInterrupt), progress.bar(3, "cut short") as bar:
        raise KeyboardInterrupt
    assert capsys.readouterr().err == ""


def test_long_work_in_a_log_says_how_far_it_is_at_most_once_per_heartbeat(monkeypatch, capsys):
    """A whole-test-split IWAE estimate runs for most of an hour on a CPU: its log shows it alive, with the
    share done and the time left, no more often than every HEARTBEAT_S, and never after its last unit."""
    clock = [0.0]
    monkeypatch.setattr(progress, "_now", lambda: clock[0])
    progress.use_bars(False)
    try:
        with progress.bar(100, "eval iwae (k=5000)", "pass") as bar:
            for _ in range(100):  # a unit every 10 s: 1000 s in all
                clock[0] += 10.0
                bar.update(1)
        with progress.bar(None, "no known size", "pass") as bar:
            clock[0] += 10 * progress.HEARTBEAT_S
            bar.update(1)
    finally:
        progress.use_bars(True)
    lines = capsys.readouterr().err.splitlines()
    beats = [line for line in lines if " after " in line]
    heartbeat = progress.HEARTBEAT_S
    assert len(beats) == int(1000 // heartbeat) - (1000 % heartbeat == 0), lines
    first = 10.0 * math.ceil(heartbeat / 10.0)  # the first unit at or past one heartbeat
    assert beats[0] == (f"eval iwae (k=5000): {first / 10:.0f}% after {progress.seconds(first)}, "
                        f"about {progress.seconds(1000 - first)} left"), beats
    assert lines[len(beats)].startswith("eval iwae (k=5000): done in ")  # then the one closing line
    assert lines[-1].startswith("no known size: done in ") and len(lines) == len(beats) + 2


def test_the_time_left_counts_only_this_processs_pace(monkeypatch, capsys):
    """A resumed sweep's bar starts at the trials done before (`initial`): 90 of 100 done, one trial in 10 min
    here leaves about 90 min, not the 1 min that 91 units in 10 min would say."""
    clock = [0.0]
    monkeypatch.setattr(progress, "_now", lambda: clock[0])
    progress.use_bars(False)
    try:
        with progress.bar(100, "sweep", "trial", initial=90, count=True) as bar:
            clock[0] += 600.0
            bar.update(1)
    finally:
        progress.use_bars(True)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "sweep: 91% after 10.0 min, about 90.0 min left", lines
