"""The process-wide state of a training session: a stop asked for by Ctrl-C, whether an
epoch is being recorded, and subnormal floats flushed to zero while training."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_stop = threading.Event()
_training = threading.Event()
_recording = threading.Event()


def request_stop() -> bool:
    """Ask the training under way to stop after its current epoch (a first Ctrl-C).
    False if no training is under way, or a stop was already asked for."""
    if not _training.is_set() or _stop.is_set():
        return False
    _stop.set()
    return True


def stop_requested() -> bool:
    return _stop.is_set()


def forget_stop() -> None:
    """A new command starts: a stop asked of an earlier one (in this process) does not apply."""
    _stop.clear()


@contextmanager
def recording_epoch() -> Iterator[None]:
    """While a member's epoch is being recorded (its metrics logged, callbacks, its resume state saved): a
    signal that stops at once would leave an epoch logged but not saved, trained and logged again on resume,
    so a Slurm TERM then waits for the save (vaelab.sweeps.slurm_task)."""
    _recording.set()
    try:
        yield
    finally:
        _recording.clear()


def recording() -> bool:
    """Whether an epoch is being recorded now (recording_epoch)."""
    return _recording.is_set()


@contextmanager
def denormals_flushed() -> Iterator[None]:
    """Treat subnormal floats as zero on CPU while training. Far in the tails, the
    Bernoulli loss's exp(-|logit|) and Adam's second moments underflow into
    subnormals, and on x86 each op that touches one is several times slower
    (measured: the elementwise half of a step 2-4x); values below 1e-38 change no
    loss a VAE reports. The setting is per process, so it is undone afterwards."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


@contextmanager
def training_session() -> Iterator[None]:
    """While training: request_stop() applies to it, and subnormals are flushed."""
    _stop.clear()
    _training.set()
    try:
        with denormals_flushed():
            yield
    finally:
        _training.clear()
