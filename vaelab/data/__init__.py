"""Datasets as tensors resident on the training device.

MNIST-sized data fits in memory many times over, so it is decoded once into a
float tensor on the device and batches are index slices of it: no DataLoader,
no per-image transforms, no host-device copies per step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vaelab.data.image_folder import load_folder
from vaelab.data.mnist_family import DataError, load_raw

__all__ = ["DataError", "ImageData", "Split", "load_data", "load_image_folder", "seeded_split", "batch_indices"]


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # float32 (N, C, H, W) in [0, 1]
    y: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.x)


@dataclass(frozen=True)
class ImageData:
    train: Split
    val: Split
    test: Split
    shape: tuple[int, int, int]  # (C, H, W)
    class_names: tuple[str, ...]
    description: str
    dynamic_binarize: bool = False  # the training loop samples binary pixels per batch
    augment: bool = False  # the training loop flips and rotates batches


def seeded_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices): a fixed permutation of range(n) by `seed`."""
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n - n_val < 1:
        raise DataError(f"data.val_fraction={val_fraction} leaves an empty train or val split of {n} images")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _to_split(images: np.ndarray, labels: np.ndarray, device: torch.device) -> Split:
    # np.array copies: IDX arrays are read-only views of the file's bytes.
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).to(device)
    x = x.unsqueeze(1).float().div_(255.0)
    return Split(x=x, y=torch.from_numpy(np.array(labels, dtype=np.int64)).to(device))


def _binarized(split: Split, generator: torch.Generator) -> Split:
    return Split(x=torch.bernoulli(split.x, generator=generator), y=split.y)


def load_data(spec, device: torch.device) -> ImageData:
    """Load `spec` (a DataSpec) as device tensors with its seeded train/val split."""
    raw = load_raw(spec.dataset, spec.root, spec.download)
    images, labels = raw.train_images, raw.train_labels
    if spec.subset is not None:
        images, labels = images[: spec.subset], labels[: spec.subset]
    train_idx, val_idx = seeded_split(len(images), spec.val_fraction, spec.split_seed)
    train = _to_split(images[train_idx], labels[train_idx], device)
    val = _to_split(images[val_idx], labels[val_idx], device)
    test = _to_split(raw.test_images, raw.test_labels, device)
    if spec.binarize != "none":
        # Evaluation sets are binarised once, with a fixed seed, so every run sees the same bits.
        generator = torch.Generator(device=device).manual_seed(10_000 + spec.split_seed)
        val, test = _binarized(val, generator), _binarized(test, generator)
        if spec.binarize == "static":
            train = _binarized(train, generator)
    return ImageData(
        train=train,
        val=val,
        test=test,
        dynamic_binarize=spec.binarize == "dynamic",
        augment=spec.augment,
        shape=(1, *raw.train_images.shape[1:]),
        class_names=raw.class_names,
        description=f"{spec.dataset} from {raw.origin}",
    )


def _from_uint8(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> Split:
    return Split(x=x.to(device).float().div_(255.0), y=y.to(device))


def load_image_folder(spec, device: torch.device) -> ImageData:
    """`root/train` + `root/test` (+ optional `root/val`), or one folder split by seed."""
    root, cache = Path(spec.root), Path(spec.cache_dir)
    if (root / "train").is_dir() and (root / "test").is_dir():
        x, y, names = load_folder(root / "train", spec, cache)
        test_x, test_y, _ = load_folder(root / "test", spec, cache)
        held_val = load_folder(root / "val", spec, cache)[:2] if (root / "val").is_dir() else None
    else:
        x, y, names = load_folder(root, spec, cache)
        keep, test_idx = seeded_split(len(x), spec.test_fraction, spec.split_seed + 1)
        test_x, test_y, x, y = x[test_idx], y[test_idx], x[keep], y[keep]
        held_val = None
    if spec.subset is not None:
        x, y = x[: spec.subset], y[: spec.subset]
    if held_val is None:
        train_idx, val_idx = seeded_split(len(x), spec.val_fraction, spec.split_seed)
        held_val, x, y = (x[val_idx], y[val_idx]), x[train_idx], y[train_idx]
    return ImageData(
        train=_from_uint8(x, y, device),
        val=_from_uint8(*held_val, device),
        test=_from_uint8(test_x, test_y, device),
        shape=(int(x.shape[1]), int(x.shape[2]), int(x.shape[3])),
        class_names=names,
        description=f"image_folder {root} ({spec.channels}x{spec.image_size}x{spec.image_size})",
        augment=spec.augment,
    )


def batch_indices(n: int, batch_size: int, generator: torch.Generator, device: torch.device) -> Iterator[torch.Tensor]:
    """Shuffled index slices covering range(n) once; the last one may be short."""
    order = torch.randperm(n, generator=generator).to(device)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]
