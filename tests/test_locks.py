"""The sweep's locks (vaelab.ops.locks): one process in at a time, whichever lock it is."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest


def _take_lock(url: str, log: str, name: str) -> None:
    from vaelab.ops.locks import database_lock, file_lock

    def write(line: str) -> None:
        with open(log, "a") as out:
            out.write(line + "\n")

    if name == "second":  # both processes start at once (imports take seconds); the first goes in first
        while "first in" not in (Path(log).read_text() if Path(log).exists() else ""):
            time.sleep(0.05)
    write(f"{name} asks")
    lock = file_lock(url[len("file:"):]) if url.startswith("file:") else database_lock(url, "vaelab prepare demo")
    with lock:
        write(f"{name} in")
        if name == "first":  # hold on until the second is waiting, and a moment more
            while "second asks" not in Path(log).read_text():
                time.sleep(0.05)
            time.sleep(1.0)
        write(f"{name} out")


@pytest.mark.parametrize("backend", ["file", "sqlite", "postgresql"])
def test_database_lock_lets_one_worker_in_at_a_time(tmp_path: Path, backend: str, request):
    url = {"file": lambda: f"file:{tmp_path / 'prepare.lock'}", "sqlite": lambda: f"sqlite:///{tmp_path / 'optuna.db'}",
           "postgresql": lambda: request.getfixturevalue("postgres_url")}[backend]()
    log = tmp_path / "order.log"
    context = multiprocessing.get_context("spawn")
    first = context.Process(target=_take_lock, args=(url, str(log), "first"))
    second = context.Process(target=_take_lock, args=(url, str(log), "second"))
    first.start()
    second.start()
    for process in (first, second):
        process.join(timeout=60)
    lines = log.read_text().splitlines()
    assert lines[1:] == ["first in", "second asks", "first out", "second in", "second out"]


def test_study_lock_takes_a_file_lock_in_the_study_folder_without_a_url(tmp_path: Path):
    from vaelab.ops.locks import study_lock

    with study_lock(None, tmp_path, "vaelab prepare demo"):
        assert (tmp_path / "prepare.lock").exists()
    with study_lock(f"sqlite:///{tmp_path / 'optuna.db'}", tmp_path, "vaelab prepare demo"):
        assert (tmp_path / "optuna.db.prepare.vaelab-lock").exists()
    with study_lock(None, tmp_path, "vaelab final-evaluation demo"):  # another purpose, another lock
        assert (tmp_path / "final-evaluation.lock").exists()
