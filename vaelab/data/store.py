"""Where a split's images live: as uint8 on the training device, or in a uint8 file on
disk read batch by batch. Either way `images[index]` is a float32 batch in [0, 1] on the
device, converted per batch: bytes take a quarter of the memory floats do, and
`uint8 -> float / 255` per batch gives exactly the numbers a float copy would.

The disk store reads with `os.preadv` into (pinned, on CUDA) buffers rather than
mapping the file: mapped pages count against the process's memory, read pages only
against the kernel's page cache, which it gives back under pressure.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

Index = int | slice | Tensor | np.ndarray
PREFETCH = 2  # batches a disk store reads ahead of the one in use


class Images:
    """uint8 (N, C, H, W) images; indexing gives float32 batches on `device`."""

    device: torch.device
    shape: tuple[int, int, int]  # (C, H, W)

    def __len__(self) -> int:
        raise NotImplementedError

    def raw(self, index: Index) -> Tensor:
        """uint8 images at `index` (any shape of indices), on the device."""
        raise NotImplementedError

    def subset(self, rows: np.ndarray) -> Images:
        """The images at `rows`, in that order (a view for disk stores)."""
        raise NotImplementedError

    def resident(self) -> ResidentImages:
        """All images as one uint8 tensor on the device."""
        raise NotImplementedError

    def __getitem__(self, index: Index) -> Tensor:
        return self.raw(index).float().div_(255.0)

    def first(self, n: int) -> Images:
        """The first n images, as a store (nothing is read until it is indexed)."""
        return self.subset(np.arange(min(n, len(self))))

    def shuffled(self, order: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(indices on the device, float images) for each batch of `order` (a CPU permutation,
        (n,) or (members, n)): consecutive slices of `batch_size` along its last dimension."""
        n = order.shape[-1]
        slices = [order[..., start : start + batch_size] for start in range(0, n, batch_size)]
        for index, images in zip(slices, self.gathered(slices), strict=True):
            yield index.to(self.device, non_blocking=True), images

    @property
    def image_bytes(self) -> int:
        c, h, w = self.shape
        return c * h * w

    @property
    def nbytes(self) -> int:
        return len(self) * self.image_bytes

    def batches(self, starts: Iterable[int], batch_size: int, prefetch: int = 0) -> Iterator[Tensor]:
        """Float batches `[start : start + batch_size]` for each start, in order."""
        for start in starts:
            yield self[start : start + batch_size]

    def gathered(self, indices: Iterable[Tensor], prefetch: int = 0) -> Iterator[Tensor]:
        """Float batches at each index tensor (CPU, any shape), in order."""
        for index in indices:
            yield self[index]


class ResidentImages(Images):
    def __init__(self, data: Tensor):
        if data.dtype != torch.uint8 or data.dim() != 4:
            raise ValueError(f"resident images must be uint8 (N, C, H, W), got {data.dtype} {tuple(data.shape)}")
        self.data, self.device = data, data.device
        self.shape = (int(data.shape[1]), int(data.shape[2]), int(data.shape[3]))

    def __len__(self) -> int:
        return len(self.data)

    def raw(self, index: Index) -> Tensor:
        if isinstance(index, np.ndarray):
            index = torch.from_numpy(np.ascontiguousarray(index))
        if isinstance(index, Tensor) and index.device != self.device:
            index = index.to(self.device)
        return self.data[index]

    def subset(self, rows: np.ndarray) -> ResidentImages:
        return ResidentImages(self.data[torch.from_numpy(_row_numbers(rows, len(self))).to(self.device)])

    def resident(self) -> ResidentImages:
        return self

    def first(self, n: int) -> ResidentImages:
        return ResidentImages(self.data[:n])

    def shuffled(self, order: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        order = order.to(self.device)  # one copy, then slices of it: no host work per step
        for start in range(0, order.shape[-1], batch_size):
            index = order[..., start : start + batch_size]
            yield index, self[index]


class DiskImages(Images):
    """Images `rows` of a raw uint8 file of `count` images of `shape`, row-major."""

    def __init__(self, path: Path, count: int, shape: tuple[int, int, int], device: torch.device,
                 rows: np.ndarray | None = None):
        self.path, self.count, self.shape, self.device = Path(path), count, shape, device
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self._fd: int | None = None
        self._pid = 0

    def __len__(self) -> int:
        return self.count if self.rows is None else len(self.rows)

    def __getstate__(self) -> dict[str, Any]:  # a copy in another process opens its own file
        return {**self.__dict__, "_fd": None, "_pid": 0}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)  # type: ignore[arg-type]

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def _file_rows(self, index: Index) -> np.ndarray:
        if isinstance(index, int):
            index = np.array([index])
        if isinstance(index, slice):
            positions = np.arange(len(self))[index]
        else:
            positions = index.cpu().numpy() if isinstance(index, Tensor) else np.asarray(index)
            positions = positions.astype(np.int64, copy=False)
            if positions.size and (positions.min() < -len(self) or positions.max() >= len(self)):
                raise IndexError(f"index out of range for {len(self)} images")
            positions = positions % max(len(self), 1)
        return positions if self.rows is None else self.rows[positions]

    def read(self, index: Index, pin: bool = False) -> Tensor:
        """uint8 images at `index`, on the host (in pinned memory when `pin`)."""
        rows = self._file_rows(index)
        flat = rows.reshape(-1)
        out = torch.empty((len(flat), self.image_bytes), dtype=torch.uint8, pin_memory=pin)
        buffer = out.numpy()
        fd, size = self._file(), self.image_bytes
        if len(flat) and np.all(np.diff(flat) == 1):  # a contiguous run: one read
            _read_exactly(fd, buffer.reshape(-1), int(flat[0]) * size)
        else:
            order = np.argsort(flat, kind="stable")  # ascending offsets: the disk reads forward
            for position in order:
                _read_exactly(fd, buffer[position], int(flat[position]) * size)
        out = out.view(*rows.shape, *self.shape)
        return out[0] if isinstance(index, int) else out

    def raw(self, index: Index) -> Tensor:
        pin = self.device.type == "cuda"
        return self.read(index, pin=pin).to(self.device, non_blocking=pin)

    def subset(self, rows: np.ndarray) -> DiskImages:
        picked = _row_numbers(rows, len(self))
        return DiskImages(self.path, self.count, self.shape, self.device,
                          picked if self.rows is None else self.rows[picked])

    def resident(self, chunk: int = 4096) -> ResidentImages:
        # Filled chunk by chunk, so the host never holds more than one chunk besides the result.
        data = torch.empty((len(self), *self.shape), dtype=torch.uint8, device=self.device)
        for start in range(0, len(self), chunk):
            data[start : start + chunk] = self.raw(slice(start, start + chunk))
        return ResidentImages(data)

    def batches(self, starts: Iterable[int], batch_size: int, prefetch: int | None = None) -> Iterator[Tensor]:
        return self._streamed((slice(s, s + batch_size) for s in starts), prefetch)

    def gathered(self, indices: Iterable[Tensor], prefetch: int | None = None) -> Iterator[Tensor]:
        return self._streamed(iter(indices), prefetch)

    def _streamed(self, indices: Iterator[Index], prefetch: int | None) -> Iterator[Tensor]:
        pin = self.device.type == "cuda"
        depth = PREFETCH if prefetch is None else prefetch
        for host in prefetched(lambda index: self.read(index, pin=pin), indices, depth):
            yield host.to(self.device, non_blocking=pin).float().div_(255.0)


def _row_numbers(rows: Any, n: int) -> np.ndarray:
    """Row numbers in [0, n) (negative ones counted from the end), as a contiguous int64 array."""
    array = np.asarray(rows)
    if array.dtype == np.bool_:
        raise TypeError("rows must be row numbers, not a mask")
    array = np.ascontiguousarray(array, dtype=np.int64)
    if array.size and (array.min() < -n or array.max() >= n):
        raise IndexError(f"row out of range for {n} images")
    return array % max(n, 1)


def _read_exactly(fd: int, into: np.ndarray, offset: int) -> None:
    view = memoryview(into.data).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise OSError(f"image cache ended early at byte {offset + done}")
        done += got


_END = object()


def prefetched(read: Callable[[Any], Tensor], items: Iterator[Any], depth: int) -> Iterator[Tensor]:
    """read(item) for each item, computed `depth` items ahead in a thread (reads release the
    GIL, so they overlap the training step); errors reach the consumer."""
    if depth <= 0:
        yield from (read(item) for item in items)
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                ready.put(read(item))
            ready.put(_END)
        except BaseException as err:  # handed to the consumer, raised there
            ready.put(err)

    thread = threading.Thread(target=produce, name="vaelab-prefetch", daemon=True)
    thread.start()
    try:
        while (got := ready.get()) is not _END:
            if isinstance(got, BaseException):
                raise got
            yield got
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                ready.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
