"""dSprites (Matthey et al. 2017): the 737,280-image factor grid (`vaelab.data.dsprites`), the official
npz in data.root if it is there, else rendered. Only the rows a run's splits take are written into
the cache, so its one part is a `GridPart`; labels are the shape (square, ellipse, heart). The grid's
rows are in factor order, so it is split by the `sampled` policy (a seeded permutation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vaelab.data import dsprites
from vaelab.data.model import Part, SplitInfo
from vaelab.data.sources.base import Read, Source


class GridPart:
    """The whole grid as a part: taking rows renders (or reads) just those into the cache."""

    def __init__(self, grid: dsprites.DSprites, npz: Path, spec: Any, show_progress: bool):
        self.grid, self.npz, self.spec, self.show_progress = grid, npz, spec, show_progress
        self.source = str(npz) if grid.path else "rendered (vaelab.data.dsprites)"

    def __len__(self) -> int:
        return self.grid.num_images

    def take(self, rows: np.ndarray, name: str) -> Part:
        import torch

        from vaelab import progress
        from vaelab.data.cache import cache_key, load_cached, write_cache

        cache_dir = Path(self.spec.cache_dir).expanduser()
        factors = self.grid.factors_at(rows)
        version = self.npz.stat().st_mtime_ns if self.grid.path else dsprites.RENDER_VERSION
        key = cache_key("dsprites", self.source, version, rows.tobytes())
        cached = load_cached(cache_dir, key)
        if cached is None:
            chunks = (self.grid.binary_images(factors[i : i + 4096]) * np.uint8(255) for i in range(0, len(rows), 4096))
            images = (image[None] for chunk in chunks for image in chunk)
            with progress.bar(len(rows), f"dsprites {name}", "img", show=self.show_progress, delay=1.0,
                              count=True) as bar:
                cached = write_cache(cache_dir, key, progress.counted(images, bar), factors[:, 0], (1, 64, 64),
                                     f"dsprites {name}")
        return Part(cached.images(torch.device("cpu")), cached.labels, SplitInfo(self.source, name, cached.digest))


def _npz(spec: Any) -> Path:
    root = Path(spec.root).expanduser()
    return root if root.is_file() else root / dsprites.NPZ_NAME


def read(spec: Any, show_progress: bool = True) -> Read:
    npz = _npz(spec)
    grid = dsprites.DSprites(npz if npz.is_file() else None)
    part = GridPart(grid, npz, spec, show_progress)
    return Read({"train": part}, dsprites.SHAPES, f"dsprites ({part.source})", factors=grid)


DSPRITES = Source(
    "dsprites", read,
    shape=lambda spec: (1, dsprites.IMAGE_SIZE, dsprites.IMAGE_SIZE),
    sizes=lambda spec: {"train": int(np.prod(dsprites.FACTOR_SIZES))},
    classes=lambda spec: len(dsprites.SHAPES),
    keys=frozenset({"data.root", "data.test_fraction"}),
    policy="sampled",
    factors=True,
    binary=True,
)
