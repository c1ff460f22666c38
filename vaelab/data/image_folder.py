"""Folders of images (PNG, JPEG, ...) at any size, RGB or grey.

Layouts: `root/train`, `root/test` (and optionally `root/val`), or one folder
split by seed; each may hold class subfolders (labels) or images directly.
Images are decoded, cropped or stretched to `data.image_size` once, and cached
as a uint8 tensor file keyed by the folder's content, so later runs start at once.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vaelab.data.mnist_family import DataError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CACHE_VERSION = 1


def list_images(folder: Path) -> tuple[list[Path], list[int], tuple[str, ...]]:
    """Image files under `folder` with labels from class subfolders (sorted names);
    images directly in `folder` get the single class 'all'."""
    if not folder.is_dir():
        raise DataError(f"{folder}: no such image folder")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes:
        files, labels = [], []
        for index, name in enumerate(classes):
            found = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in EXTENSIONS)
            files += found
            labels += [index] * len(found)
        names = tuple(classes)
    else:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS)
        labels, names = [0] * len(files), ("all",)
    if not files:
        raise DataError(f"{folder}: no images ({', '.join(sorted(EXTENSIONS))}) found")
    return files, labels, names


def _decode(path: Path, channels: int, size: int, resize: str) -> np.ndarray | None:
    try:
        with Image.open(path) as opened:
            image = opened.convert("L" if channels == 1 else "RGB")
            if resize == "crop":  # centre square, then scale: no distortion
                side = min(image.size)
                left, top = (image.size[0] - side) // 2, (image.size[1] - side) // 2
                image = image.crop((left, top, left + side, top + side))
            image = image.resize((size, size), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        print(f"vaelab: warning: skipping unreadable image {path} ({type(err).__name__})", file=sys.stderr)
        return None
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _cache_key(files: list[Path], spec) -> str:
    digest = hashlib.sha256(f"{CACHE_VERSION}|{spec.image_size}|{spec.channels}|{spec.resize}".encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def load_folder(folder: Path, spec, cache_dir: Path) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """(uint8 images (N, C, S, S), int64 labels, class names), from the cache when the
    folder's files are unchanged."""
    files, labels, names = list_images(folder)
    cache = cache_dir / f"{_cache_key(files, spec)}.pt"
    if cache.is_file():
        try:
            blob = torch.load(cache, weights_only=True)
            return blob["x"], blob["y"], tuple(blob["names"])
        except Exception:
            pass  # a damaged cache is rebuilt below
    images, kept = [], []
    for path, label in zip(files, labels, strict=True):
        array = _decode(path, spec.channels, spec.image_size, spec.resize)
        if array is not None:
            images.append(array)
            kept.append(label)
    if not images:
        raise DataError(f"{folder}: none of the {len(files)} images could be read")
    x, y = torch.from_numpy(np.stack(images)), torch.tensor(kept, dtype=torch.int64)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    torch.save({"x": x, "y": y, "names": list(names)}, tmp)
    os.replace(tmp, cache)  # atomic: a concurrent reader never sees half a file
    return x, y, names


def image_count(root: Path) -> int:
    """Number of image files (for cost estimates), without decoding."""
    return sum(1 for p in root.rglob("*") if p.suffix.lower() in EXTENSIONS)
