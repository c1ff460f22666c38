"""The data model: a source's parts before they are placed (`Part`), and the placed splits a run
trains and evaluates on (`Split`, `ImageData`). Imports no torch at module level, so source
records and the split policy can be read by `--dry-run` and spec checks."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from vaelab.data.store import Images


@dataclass(frozen=True)
class SplitInfo:
    """What a split is, for the run's record (MLflow dataset inputs)."""

    source: str  # where it was read: a folder, IDX files, a Hugging Face dataset
    name: str  # the source's own name for it: "Training Data", "train", "train (held out 10%)"
    digest: str  # sha256 of its images and labels (a held-out part: of its parent and its rows)


@dataclass(frozen=True)
class Part:
    """A split before it is placed: images on the host or in the cache, labels, info."""

    images: Images
    labels: np.ndarray
    info: SplitInfo

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: np.ndarray, name: str) -> Part:
        digest = hashlib.sha256(f"{self.info.digest}|{name}|".encode() + np.asarray(rows, np.int64).tobytes())
        return Part(self.images.subset(rows), self.labels[rows], replace(self.info, name=name,
                                                                         digest=digest.hexdigest()))


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
        import torch

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
