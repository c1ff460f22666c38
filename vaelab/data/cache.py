"""The decoded-image cache: one split of a dataset as a raw uint8 file of (C, H, W)
images, its labels (`.labels.npy`, read without pickle) and a JSON record (count,
shape, content digest). Written once, streamed or loaded by every later run.

A cache entry is complete when its JSON record exists: the record is renamed into
place last, each file atomically, so a reader never sees half an entry and two
processes building the same entry at once both end with a whole one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaelab.data.store import DiskImages
from vaelab.errors import DataError

CACHE_VERSION = 2


@dataclass(frozen=True)
class CachedSplit:
    path: Path  # the raw uint8 images
    count: int
    shape: tuple[int, int, int]
    labels: np.ndarray  # int64 (count,)
    digest: str  # sha256 of the images' bytes and the labels
    skipped: int = 0  # source images that could not be read

    def images(self, device: torch.device) -> DiskImages:
        return DiskImages(self.path, self.count, self.shape, device)


def cache_key(*parts: object) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    for part in parts:
        digest.update(b"|" + str(part).encode())
    return digest.hexdigest()[:24]


def _record_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"{key}.json"


def load_cached(cache_dir: Path, key: str) -> CachedSplit | None:
    """The complete entry `key`, or None (absent, or damaged: then it is rebuilt)."""
    try:
        record = json.loads(_record_path(cache_dir, key).read_text())
        shape = tuple(int(v) for v in record["shape"])
        path, count = cache_dir / f"{key}.u8", int(record["count"])
        labels = np.load(cache_dir / f"{key}.labels.npy", allow_pickle=False)
        if path.stat().st_size != count * int(np.prod(shape)) or labels.shape != (count,):
            return None
        return CachedSplit(path, count, (shape[0], shape[1], shape[2]), labels.astype(np.int64),
                           str(record["digest"]), int(record.get("skipped", 0)))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_writable(cache_dir: Path) -> None:
    """data.cache_dir created and written to once (a probe file, removed at once): a folder that
    cannot take an entry is one line before any image is decoded, not a traceback after."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache_dir, prefix=".probe"):
            pass
    except OSError as err:
        raise DataError(f"data.cache_dir: cannot write to {cache_dir} ({_why(err)})") from None


def _why(err: OSError) -> str:
    if isinstance(err, FileExistsError):  # mkdir(exist_ok=True) on a path that is not a folder
        return "it is a file, not a folder"
    if isinstance(err, NotADirectoryError):
        return "a part of the path is a file, not a folder"
    return (err.strerror or str(err)).lower()


def write_cache(cache_dir: Path, key: str, images: Iterable[np.ndarray | None], labels: Sequence[int] | np.ndarray,
                shape: tuple[int, int, int], what: str) -> CachedSplit:
    """Stream `images` (uint8 (C, H, W) each, or None for one that could not be read, which
    is dropped with its label) into the entry `key`; never holds more than one image."""
    check_writable(cache_dir)
    tmp = f".tmp{os.getpid()}"
    data_path = cache_dir / f"{key}.u8"
    digest, kept = hashlib.sha256(), []
    partial = data_path.with_name(data_path.name + tmp)
    try:
        with open(partial, "wb") as out:
            for label, image in zip(labels, images, strict=True):
                if image is None:
                    continue
                if image.shape != shape or image.dtype != np.uint8:
                    raise DataError(f"{what}: decoded image of {image.shape} {image.dtype}, expected {shape} uint8")
                block = np.ascontiguousarray(image).tobytes()
                out.write(block)
                digest.update(block)
                kept.append(int(label))
    except BaseException:  # a failed or interrupted decode leaves no multi-GB partial file behind
        partial.unlink(missing_ok=True)
        raise
    if not kept:
        os.unlink(data_path.with_name(data_path.name + tmp))
        raise DataError(f"{what}: none of its {len(labels)} images could be read")
    label_array = np.asarray(kept, dtype=np.int64)
    digest.update(label_array.tobytes())
    labels_path = cache_dir / f"{key}.labels.npy"
    with open(labels_path.with_name(labels_path.name + tmp), "wb") as out:
        np.save(out, label_array, allow_pickle=False)
    skipped, hexdigest = len(labels) - len(kept), digest.hexdigest()
    record = {"count": len(kept), "shape": list(shape), "digest": hexdigest, "skipped": skipped, "source": what}
    record_path = _record_path(cache_dir, key)
    record_path.with_name(record_path.name + tmp).write_text(json.dumps(record))
    for final in (data_path, labels_path, record_path):  # the record last: it marks the entry whole
        os.replace(final.with_name(final.name + tmp), final)
    return CachedSplit(data_path, len(kept), shape, label_array, hexdigest, skipped)


def array_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """The digest write_cache would give these arrays (for data read straight into memory)."""
    digest = hashlib.sha256(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    digest.update(np.asarray(labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


def decoded(sources: Sequence[Any], labels: Sequence[int] | np.ndarray, key_parts: Sequence[object], spec: Any,
            what: str, names: Sequence[str] | None = None, progress: bool = True) -> CachedSplit:
    """Image files or encoded bytes decoded at data.image_size / channels / resize into the
    cache entry named by `key_parts` and those settings, or that entry when it exists."""
    from vaelab.data.decode import decode_many  # imports no torch: its workers start fast

    key = cache_key(*key_parts, spec.image_size, spec.channels, spec.resize)
    cache_dir = Path(spec.cache_dir).expanduser()
    found = load_cached(cache_dir, key)
    if found is not None:
        return found
    check_writable(cache_dir)  # before decoding: an unusable folder would waste all of it
    shape = (spec.channels, spec.image_size, spec.image_size)
    images = decode_many(sources, spec.channels, spec.image_size, spec.resize, names=names,
                         workers=spec.decode_workers, desc=f"decoding {what}", progress=progress)
    cached = write_cache(cache_dir, key, images, labels, shape, what)
    if cached.skipped:
        print(f"vaelab: warning: {what}: {cached.skipped} of {len(labels)} images could not be read and are "
              "left out", file=sys.stderr)
    return cached
