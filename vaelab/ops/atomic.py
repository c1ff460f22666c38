"""Files that are either wholly old or wholly new: write beside the target, fsync,
rename. Ctrl-C and SIGTERM are held back while a file is written (and delivered
right after), so an interrupt never lands inside a half-written zip archive."""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_DEFERRED = {signal.SIGINT, signal.SIGTERM}


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Block SIGINT and SIGTERM in this thread for the block's duration; pending ones arrive after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Call write(temp_path), then move the finished file onto `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    temp = Path(tmp)
    try:
        with signals_deferred():
            write(temp)
            with open(temp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


def atomic_torch_save(path: Path, obj: object) -> Path:
    """torch.save, atomically. Serialised in memory first: torch's zip writer turns a
    failed write (a full disk) into an opaque RuntimeError, Python's file I/O into the OSError it is."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write(path, lambda temp: temp.write_bytes(buffer.getbuffer()))
