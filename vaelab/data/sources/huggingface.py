"""A Hugging Face image dataset (data.hf): by hub name from the local cache, or a save_to_disk
folder or parquet files, decoded like an image folder. `vaelab.data.huggingface` is the only
module that imports `datasets`; this record imports it only when the data set is opened."""

from __future__ import annotations

from typing import Any

from vaelab.data.model import Part, SplitInfo
from vaelab.data.sources.base import Read, Source, Takeable
from vaelab.data.sources.image_folder import DECODED_KEYS


def _opened(spec: Any, show_progress: bool = True) -> Any:
    from vaelab.data.huggingface import open_hf

    return open_hf(spec.hf, spec.splits, show_progress)


def read(spec: Any, show_progress: bool = True) -> Read:
    import torch

    from vaelab.data.cache import decoded

    opened = _opened(spec, show_progress)
    parts: dict[str, Takeable] = {}
    for role, split in opened.splits.items():
        own_name = opened.split_names.get(role, role)
        cached = decoded(split.images, split.labels, ["huggingface", opened.fingerprint, own_name], spec,
                         f"{opened.source} [{own_name}]", names=split.names, progress=show_progress)
        parts[role] = Part(cached.images(torch.device("cpu")), cached.labels,
                           SplitInfo(opened.source, own_name, cached.digest))
    return Read(parts, opened.class_names,
                f"huggingface {opened.source} ({spec.channels}x{spec.image_size}x{spec.image_size})")


HUGGINGFACE = Source(
    "huggingface", read,
    shape=lambda spec: (spec.channels, spec.image_size, spec.image_size),
    sizes=lambda spec: {role: len(split.labels) for role, split in _opened(spec).splits.items()},
    classes=lambda spec: len(_opened(spec).class_names),
    keys=DECODED_KEYS | {"data.hf."},
)
