"""Datasets as uint8 images on the training device, or streamed from a disk cache.

A split's images are an `Images` store (`vaelab.data.store`): indexing it gives a float
batch in [0, 1] on the device, so training and evaluation code is the same for both.
Images are resident (no DataLoader, batches are index slices, no host-device copies)
when they fit `data.memory_budget`, else read from the decoded-image cache batch by
batch, a few batches ahead, in the same seeded order.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaelab.data.cache import array_digest, cache_key, load_cached, write_cache
from vaelab.data.memory import budget_bytes, choose_storage, show_bytes
from vaelab.data.mnist_family import DataError, load_raw
from vaelab.data.store import DiskImages, Images, ResidentImages

__all__ = ["DataError", "ImageData", "Split", "SplitInfo", "load_data", "load_image_folder", "load_huggingface",
           "seeded_split"]


@dataclass(frozen=True)
class SplitInfo:
    """What a split is, for the run's record (MLflow dataset inputs)."""

    source: str  # where it was read: a folder, IDX files, a Hugging Face dataset
    name: str  # the source's own name for it: "Training Data", "train", "train (held out 10%)"
    digest: str  # sha256 of its images and labels (a held-out part: of its parent and its rows)


@dataclass(frozen=True)
class Split:
    x: Images  # uint8 (N, C, H, W); x[index] is a float32 batch in [0, 1] on the device
    y: torch.Tensor  # int64 (N,), on the device
    info: SplitInfo | None = None

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
    name: str = ""  # the dataset (data.dataset)
    storage: str = "resident"  # or "stream": read from the disk cache batch by batch
    factors: Any = None  # ground-truth factors (a disentanglement.metrics.FactorData), if the data has them

    def splits(self) -> dict[str, Split]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def records(self) -> list[dict[str, Any]]:
        """What each split is, as MLflow dataset inputs want it (contexts train / validation /
        test): source, split name, content digest, and a profile of counts, classes and shape."""
        out = []
        for role, context in (("train", "train"), ("val", "validation"), ("test", "test")):
            split = self.splits()[role]
            info = split.info or SplitInfo(self.description, role, "")
            counts = torch.bincount(split.y.cpu(), minlength=len(self.class_names)).tolist()
            profile = {"images": len(split), "split": info.name, "classes": list(self.class_names),
                       "images_per_class": dict(zip(self.class_names, counts, strict=False)),
                       "channels": self.shape[0], "height": self.shape[1], "width": self.shape[2],
                       "dtype": "uint8", "sha256": info.digest, "storage": self.storage}
            out.append({"context": context, "name": f"{self.name} [{info.name}]"[:500], "digest": info.digest[:32],
                        "source": info.source, "profile": profile})
        return out


def seeded_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices): a fixed permutation of range(n) by `seed`."""
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n - n_val < 1:
        raise DataError(f"data.val_fraction={val_fraction} leaves an empty train or val split of {n} images")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


@dataclass(frozen=True)
class _Part:
    """A split before it is placed: images on the host or in the cache, labels, info."""

    images: Images
    labels: np.ndarray
    info: SplitInfo

    def take(self, rows: np.ndarray, name: str) -> _Part:
        digest = hashlib.sha256(f"{self.info.digest}|{name}|".encode() + np.asarray(rows, np.int64).tobytes())
        return _Part(self.images.subset(rows), self.labels[rows], replace(self.info, name=name,
                                                                          digest=digest.hexdigest()))


def _held_out(parts: dict[str, _Part], spec: Any) -> dict[str, _Part]:
    """train, val and test parts: missing ones held out of train by seed, as `data` says."""
    train = parts["train"]
    if "test" not in parts:
        keep, held = seeded_split(len(train.labels), spec.test_fraction, spec.split_seed + 1)
        parts = {**parts, "test": train.take(held, f"{train.info.name} (held out {spec.test_fraction:g} for test)"),
                 "train": train.take(keep, train.info.name)}
        train = parts["train"]
    if spec.subset is not None and spec.subset < len(train.labels):
        train = train.take(np.arange(spec.subset), f"{train.info.name} (first {spec.subset})")
    if "val" not in parts:
        keep, held = seeded_split(len(train.labels), spec.val_fraction, spec.split_seed)
        parts = {**parts, "val": train.take(held, f"{train.info.name} (held out {spec.val_fraction:g} for val)")}
        train = train.take(keep, train.info.name)
    return {**parts, "train": train}


def _spill(images: Images, cache_dir: Path, digest: str, device: torch.device) -> DiskImages:
    """Resident images written to the cache (once: keyed by their content), to be streamed
    (a budget smaller than a small set)."""
    key = cache_key("spilled", digest)
    cached = load_cached(cache_dir, key)
    if cached is None:
        data = images.resident().data.cpu().numpy()
        cached = write_cache(cache_dir, key, iter(data), [0] * len(data), images.shape, f"spilled {digest[:12]}")
    return cached.images(device)


def _place(parts: dict[str, _Part], spec: Any, device: torch.device) -> tuple[dict[str, Split], str]:
    """Splits on the device, resident or streamed by data.storage and data.memory_budget."""
    needed = sum(part.images.nbytes for part in parts.values())
    budget = budget_bytes(spec.memory_budget, device)
    storage = choose_storage(spec.storage, needed, budget)
    if storage == "stream" and spec.storage == "auto":
        print(f"vaelab: images take {show_bytes(needed)}, more than data.memory_budget ({show_bytes(budget)}): "
              f"streaming them from {spec.cache_dir}", file=sys.stderr)
    placed = {}
    for role, part in parts.items():
        on_device: Images = part.images
        if isinstance(on_device, DiskImages):  # read straight to the device, chunk by chunk
            on_device = DiskImages(on_device.path, on_device.count, on_device.shape, device, on_device.rows)
        if storage == "resident":
            images: Images = on_device.resident()
            if images.device != device:
                images = ResidentImages(images.resident().data.to(device))
        elif isinstance(on_device, DiskImages):
            images = on_device
        else:
            images = _spill(part.images, Path(spec.cache_dir).expanduser(), part.info.digest, device)
        placed[role] = Split(images, torch.from_numpy(np.ascontiguousarray(part.labels)).to(device), part.info)
    return placed, storage


def _binarized(split: Split, generator: torch.Generator) -> Split:
    bits = torch.bernoulli(split.x[:], generator=generator).mul_(255).to(torch.uint8)
    # The digest of the bits themselves: they depend on the seed, the split and the device.
    digest = array_digest(bits.cpu().numpy(), split.y.cpu().numpy())
    info = None if split.info is None else replace(split.info, digest=digest)
    return Split(ResidentImages(bits), split.y, info)


def _binarize(splits: dict[str, Split], mode: str, seed: int, device: torch.device) -> dict[str, Split]:
    # Evaluation sets are binarised once, with a fixed seed, so every run sees the same bits.
    generator = torch.Generator(device=device).manual_seed(10_000 + seed)
    out = {**splits, "val": _binarized(splits["val"], generator), "test": _binarized(splits["test"], generator)}
    if mode == "static":
        out["train"] = _binarized(splits["train"], generator)
    return out


def load_data(spec: Any, device: torch.device, show_progress: bool = True) -> ImageData:
    """Fashion-MNIST or MNIST (a DataSpec) with its seeded train/val split."""
    raw = load_raw(spec.dataset, spec.root, spec.download)

    def part(images: np.ndarray, labels: np.ndarray, name: str) -> _Part:
        # np.array copies: IDX arrays are read-only views of the file's bytes.
        data = torch.from_numpy(np.array(images, dtype=np.uint8)).unsqueeze(1)
        return _Part(ResidentImages(data), labels, SplitInfo(str(raw.origin), name, array_digest(images, labels)))

    parts = _held_out({"train": part(raw.train_images, raw.train_labels, "train"),
                       "test": part(raw.test_images, raw.test_labels, "t10k")}, spec)
    if spec.binarize != "none":  # bits are drawn on the device, then placed like any images
        resident = {role: Split(ResidentImages(p.images.resident().data.to(device)), torch.from_numpy(p.labels),
                                p.info) for role, p in parts.items()}
        binarized = _binarize(resident, spec.binarize, spec.split_seed, device)
        parts = {role: _Part(s.x, p.labels, s.info or p.info) for (role, p), s in
                 zip(parts.items(), (binarized[r] for r in parts), strict=True)}
    splits, storage = _place(parts, spec, device)
    return ImageData(
        train=splits["train"], val=splits["val"], test=splits["test"],
        dynamic_binarize=spec.binarize == "dynamic",
        augment=spec.augment,
        shape=(1, *raw.train_images.shape[1:]),
        class_names=raw.class_names,
        description=f"{spec.dataset} from {raw.origin}",
        name=spec.dataset,
        storage=storage,
    )


def load_image_folder(spec: Any, device: torch.device, show_progress: bool = True) -> ImageData:
    """A folder of images: its split folders (by name or data.splits), or one folder split by seed."""
    from vaelab.data.image_folder import cache_split, class_names, list_split, split_folders

    root = Path(spec.root).expanduser()
    folders = split_folders(root, spec.splits)
    listed = {role: list_split(folder) for role, folder in folders.items()}
    names = class_names(listed)
    parts = {}
    for role, split in listed.items():
        cached = cache_split(split, names, spec, show_progress)
        name = split.folder.name if split.folder != root else root.name
        parts[role] = _Part(cached.images(torch.device("cpu")), cached.labels,
                            SplitInfo(str(split.folder), name, cached.digest))
    splits, storage = _place(_held_out(parts, spec), spec, device)
    layout = ", ".join(f"{role}={folder.name!r}" for role, folder in folders.items())
    return ImageData(
        train=splits["train"], val=splits["val"], test=splits["test"],
        shape=(spec.channels, spec.image_size, spec.image_size),
        class_names=names,
        description=f"image_folder {root} ({layout}; {spec.channels}x{spec.image_size}x{spec.image_size})",
        augment=spec.augment,
        name="image_folder",
        storage=storage,
    )


def load_huggingface(spec: Any, device: torch.device, show_progress: bool = True) -> ImageData:
    """A Hugging Face dataset (data.hf): by hub name from the local cache, or saved to disk / parquet."""
    from vaelab.data.cache import decoded
    from vaelab.data.huggingface import open_hf

    opened = open_hf(spec.hf, spec.splits, show_progress)
    parts = {}
    for role, split in opened.splits.items():
        own_name = opened.split_names.get(role, role)
        cached = decoded(split.images, split.labels, ["huggingface", opened.fingerprint, own_name], spec,
                         f"{opened.source} [{own_name}]", names=split.names, progress=show_progress)
        parts[role] = _Part(cached.images(torch.device("cpu")), cached.labels,
                            SplitInfo(opened.source, own_name, cached.digest))
    splits, storage = _place(_held_out(parts, spec), spec, device)
    return ImageData(
        train=splits["train"], val=splits["val"], test=splits["test"],
        shape=(spec.channels, spec.image_size, spec.image_size),
        class_names=opened.class_names,
        description=f"huggingface {opened.source} ({spec.channels}x{spec.image_size}x{spec.image_size})",
        augment=spec.augment,
        name="huggingface",
        storage=storage,
    )


def _dsprites_rows(n: int, spec: Any) -> dict[str, np.ndarray]:
    """Grid rows of each split: a seeded permutation of the grid cut into test, val and train
    (data.subset keeps that many training images, a random sample of the grid, not its first rows)."""
    order = np.random.default_rng(spec.split_seed).permutation(n)
    n_test = int(round(n * spec.test_fraction))
    rest = order[n_test:] if spec.subset is None else order[n_test : n_test + spec.subset]
    n_val = int(round(len(rest) * spec.val_fraction))
    if n_val < 1 or len(rest) - n_val < 1:
        raise DataError(f"data.val_fraction={spec.val_fraction} leaves an empty train or val split")
    return {"train": np.sort(rest[n_val:]), "val": np.sort(rest[:n_val]), "test": np.sort(order[:n_test])}


def load_dsprites(spec: Any, device: torch.device, show_progress: bool = True) -> ImageData:
    """dSprites (Matthey et al. 2017): the official npz in data.root if it is there, else the grid
    rendered; the images each split needs are written once into the cache. Labels are the shape
    (square, ellipse, heart); `factors` samples and renders the whole grid for the metrics."""
    from tqdm.auto import tqdm

    from vaelab.data import dsprites

    root = Path(spec.root).expanduser()
    npz = root if root.is_file() else root / dsprites.NPZ_NAME
    grid = dsprites.DSprites(npz if npz.is_file() else None)
    source = str(npz) if grid.path else "rendered (vaelab.data.dsprites)"
    parts = {}
    for role, rows in _dsprites_rows(grid.num_images, spec).items():
        factors = grid.factors_at(rows)
        version = npz.stat().st_mtime_ns if grid.path else dsprites.RENDER_VERSION
        key = cache_key("dsprites", source, version, rows.tobytes())
        cached = load_cached(Path(spec.cache_dir).expanduser(), key)
        if cached is None:
            chunks = (grid.binary_images(factors[i : i + 4096]) * np.uint8(255) for i in range(0, len(rows), 4096))
            images = (image[None] for chunk in chunks for image in chunk)
            bar = tqdm(images, total=len(rows), desc=f"dsprites {role}", unit="img", disable=not show_progress,
                       delay=1.0)
            cached = write_cache(Path(spec.cache_dir).expanduser(), key, bar, factors[:, 0], (1, 64, 64),
                                 f"dsprites {role}")
        parts[role] = _Part(cached.images(torch.device("cpu")), cached.labels, SplitInfo(source, role, cached.digest))
    splits, storage = _place(parts, spec, device)
    return ImageData(
        train=splits["train"], val=splits["val"], test=splits["test"], shape=(1, 64, 64),
        class_names=dsprites.SHAPES, description=f"dsprites ({source})", augment=spec.augment, name="dsprites",
        storage=storage, factors=grid,
    )
