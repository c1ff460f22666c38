"""`vaelab encode`: the latent means and log-variances of images (a file, or every image in a folder) or of a
split of the model's data, with their labels and where each came from, written as .npz or .parquet.

.npz (numpy): `mu` and `logvar` (N, z_dim) float32, `label` (N,) int64 (-1: not known), `file` (N,) text (the
image's path under the folder) or `index` (N,) int64 (its row in the split), and `classes` (the labels' names).
Only plain arrays, so `np.load(path)` reads it with numpy's default allow_pickle=False.
.parquet (pyarrow): one row per image, columns `file` or `index`, `label`, `class`, `mu_0..`, `logvar_0..`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaelab import progress
from vaelab.errors import DataError, UsageError
from vaelab.loaded import BATCH, LoadedModel

SPLITS = ("train", "val", "test")


@dataclass
class Latents:
    mu: np.ndarray  # (N, z_dim) float32
    logvar: np.ndarray  # (N, z_dim) float32
    label: np.ndarray  # (N,) int64; -1 where the images' labels are not known
    key: str  # "path" or "index": what `ids` are ("file" would clash with np.savez's own argument)
    ids: np.ndarray  # (N,) the images' paths under the folder, or their rows in the split
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.mu)


def check_out(out: Path) -> Path:
    if out.suffix.lower() not in WRITERS:
        raise UsageError(f"--out: expected a {' or '.join(WRITERS)} file name, got {out}")
    if not out.parent.is_dir():
        raise UsageError(f"--out: folder {out.parent} does not exist")
    return out


def image_files(path: Path) -> tuple[list[Path], Path]:
    """The image files `path` names (itself, or every image under a folder, sorted), and the folder their names
    are given relative to."""
    if path.is_file():
        return [path], path.parent
    if not path.is_dir():
        raise UsageError(f"--images: {path}: no such file or folder")
    from vaelab.data.decode import walk_images

    found, _others = walk_images(path)
    if not found:
        raise DataError(f"--images: no image files under {path}")
    return found, path


def from_images(model: LoadedModel, path: Path, label: str | None, show_progress: bool = True) -> Latents:
    """The latents of the images `path` names, each cropped and resized as training data was. In a folder, a file
    that cannot be read is skipped with a warning (one file given alone is an error)."""
    from vaelab.data.images import load_image

    files, base = image_files(path)
    y = model.labels(label, 1, "--label")
    index = -1 if y is None else int(y[0])
    mus, logvars, names = [], [], []
    skipped: list[str] = []
    with progress.bar(len(files), "encoding images", unit="images", show=show_progress, count=True) as bar:
        for start in range(0, len(files), BATCH):
            batch, kept = [], []
            for file in files[start:start + BATCH]:
                try:
                    batch.append(load_image(file, model.image_shape))
                    kept.append(file)
                except DataError as err:
                    if len(files) == 1:
                        raise
                    skipped.append(str(err))
                bar.update(1)
            if batch:
                mu, logvar = model.encode(torch.cat(batch), None if y is None else index)
                mus.append(mu.numpy())
                logvars.append(logvar.numpy())
                names += [f.relative_to(base).as_posix() for f in kept]
    if skipped:
        print(f"vaelab: warning: skipped {len(skipped)} of {len(files)} files that cannot be read (first: "
              f"{skipped[0]})", file=sys.stderr)
    if not names:
        raise DataError(f"--images: none of the {len(files)} image files under {path} could be read")
    return Latents(np.concatenate(mus), np.concatenate(logvars), np.full(len(names), index, np.int64), "path",
                   np.array(names, dtype=str), model.classes)


def from_split(model: LoadedModel, split: str, show_progress: bool = True) -> Latents:
    """The latents of a split of the data the model was trained on (read where its spec says), in row order."""
    from vaelab.registry import load_dataset

    if split not in SPLITS:
        raise UsageError(f"--split: expected one of {', '.join(SPLITS)}, got {split}")
    data = load_dataset(model.run_spec.data, model.device, show_progress)
    part = data.splits()[split]
    mus, logvars = [], []
    starts = range(0, len(part), BATCH)
    with progress.bar(len(part), f"encoding {split}", unit="images", show=show_progress, count=True) as bar:
        for start, x in zip(starts, part.x.batches(starts, BATCH), strict=True):
            y = part.y[start:start + len(x)] if model.conditional else None
            mu, logvar = model.encode(x, y)
            mus.append(mu.numpy())
            logvars.append(logvar.numpy())
            bar.update(len(x))
    return Latents(np.concatenate(mus), np.concatenate(logvars), part.y.cpu().numpy().astype(np.int64), "index",
                   np.arange(len(part), dtype=np.int64), tuple(data.class_names) or model.classes)


def _write_npz(latents: Latents, path: Path, meta: dict[str, Any]) -> None:
    arrays = {"mu": latents.mu, "logvar": latents.logvar, "label": latents.label,
              "classes": np.array(latents.classes, dtype=str), latents.key: latents.ids}
    with open(path, "wb") as file:  # a file object: np.savez would add .npz to the temporary name
        np.savez(file, **arrays)  # type: ignore[arg-type]  # numpy's stub reads any ** as allow_pickle


def _write_parquet(latents: Latents, path: Path, meta: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    named = [latents.classes[i] if 0 <= i < len(latents.classes) else None for i in latents.label.tolist()]
    columns = {latents.key: latents.ids, "label": latents.label, "class": pa.array(named, pa.string())}
    columns.update({f"mu_{j}": latents.mu[:, j] for j in range(latents.mu.shape[1])})
    columns.update({f"logvar_{j}": latents.logvar[:, j] for j in range(latents.logvar.shape[1])})
    table = pa.table(columns).replace_schema_metadata({f"vaelab.{k}": str(v) for k, v in meta.items()})
    pq.write_table(table, path)


# Each output format by its file suffix.
WRITERS: dict[str, Callable[[Latents, Path, dict[str, Any]], None]] = {".npz": _write_npz, ".parquet": _write_parquet}


def write_latents(latents: Latents, out: Path, meta: dict[str, Any] | None = None) -> Path:
    """`latents` in `out` (.npz or .parquet, by its suffix), written whole or not at all."""
    from vaelab.ops.atomic import atomic_write

    check_out(out)
    writer = WRITERS[out.suffix.lower()]
    atomic_write(out, lambda path: writer(latents, path, meta or {}))
    return out
