"""MNIST and Fashion-MNIST (LeCun et al. 1998; Xiao et al. 2017): 28x28 grey digits or clothes in
ten classes, an official train part of 60,000 and test part of 10,000 (IDX files, found or
downloaded by `vaelab.data.mnist_family`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from vaelab.data import mnist_family
from vaelab.data.model import Part, SplitInfo
from vaelab.data.sources.base import Read, Source


def read(spec: Any, show_progress: bool = True) -> Read:
    import torch

    from vaelab.data.cache import array_digest
    from vaelab.data.store import ResidentImages

    raw = mnist_family.load_raw(spec.dataset, spec.root, spec.download)

    def part(images: np.ndarray, labels: np.ndarray, name: str) -> Part:
        # np.array copies: IDX arrays are read-only views of the file's bytes.
        data = torch.from_numpy(np.array(images, dtype=np.uint8)).unsqueeze(1)
        return Part(ResidentImages(data), labels, SplitInfo(str(raw.origin), name, array_digest(images, labels)))

    return Read({"train": part(raw.train_images, raw.train_labels, "train"),
                 "test": part(raw.test_images, raw.test_labels, "t10k")},
                raw.class_names, f"{spec.dataset} from {raw.origin}")


def _source(name: str) -> Source:
    return Source(
        name, read,
        shape=lambda spec: (1, 28, 28),
        sizes=lambda spec: mnist_family.sizes(spec.dataset, spec.root),
        classes=lambda spec: len(mnist_family.SOURCES[spec.dataset].class_names),
        keys=frozenset({"data.root", "data.download"}),
    )


MNIST = _source("mnist")
FASHION_MNIST = _source("fashion_mnist")
