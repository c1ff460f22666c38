"""Resumable training state: what a run needs to carry on after it was killed.

After every `train.checkpoint_every` epochs, fit() hands a TrainState (weights,
optimiser moments, the batch-order and noise generators, early-stopping state,
the history so far) to a writer; `save_state` writes it atomically (vaelab.ops.atomic),
so a kill at any instant leaves the previous state or the new one, never half a
file. Rerunning the same command finds the state by experiment and run hash and
continues from the next epoch, with the same numbers an uninterrupted run would
produce. Like train.py, this knows nothing of MLflow.
"""

from __future__ import annotations

import fcntl
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from vaelab.errors import ResumeError, RunInProgress
from vaelab.ops.atomic import atomic_torch_save

STATE_FILE = "state.pt"
STATE_FORMAT = 1


@dataclass
class TrainState:
    epoch: int  # last completed epoch
    model: dict
    optimizer: dict
    batch_gen: torch.Tensor
    noise_gen: torch.Tensor
    history: list[dict[str, float]]
    best_epoch: int
    best_val_loss: float
    best_state: dict
    stale: int
    run_id: str = ""  # the MLflow run to continue
    run_hash: str = ""
    retried: bool = False  # nan_policy: retry has used its one rollback
    aux: dict = field(default_factory=dict)  # what else the objective trains (factorvae: its discriminator)


def state_dir(root: Path, experiment: str, run_hash: str) -> Path:
    folder = (root / experiment / run_hash).resolve()
    if not folder.is_relative_to(root.resolve()):  # names are validated; this is the last line of defence
        raise ResumeError(f"experiment {experiment!r} escapes {root}")
    return folder


def save_state(folder: Path, state: TrainState) -> Path:
    """Write `state` to folder/state.pt atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    return atomic_torch_save(folder / STATE_FILE, {"format": STATE_FORMAT, **asdict(state)})


def load_state(folder: Path, run_hash: str) -> TrainState | None:
    """The saved state in `folder`, None if there is none; ResumeError if it is unusable."""
    path = folder / STATE_FILE
    if not path.is_file():
        return None
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ResumeError(f"{path}: unreadable resume state ({str(err).splitlines()[0][:200]}); "
                          "delete the folder to start the run afresh") from None
    if not isinstance(raw, dict) or raw.pop("format", None) != STATE_FORMAT:
        raise ResumeError(f"{path}: not a vaelab resume state of format {STATE_FORMAT}")
    try:
        state = TrainState(**raw)
    except TypeError as err:
        raise ResumeError(f"{path}: incomplete resume state ({err})") from None
    if state.run_hash != run_hash:
        raise ResumeError(f"{path}: saved for run {state.run_hash}, not {run_hash}")
    return state


def clear_state(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def holding(folder: Path) -> Iterator[None]:
    """Exclusive use of a run's state folder for this process (two identical
    commands at once would otherwise train the same run twice)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunInProgress(f"this run is already training in another process (state in {folder})") from None
        yield
