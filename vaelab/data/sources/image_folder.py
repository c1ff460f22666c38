"""A folder of images (PNG, JPEG, ...) in the layout a researcher has: split folders recognised by
name or named by data.splits, class folders as labels, decoded at data.image_size / channels /
resize into the cache (`vaelab.data.image_folder`, `vaelab.data.cache`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vaelab.data import image_folder
from vaelab.data.model import Part, SplitInfo
from vaelab.data.sources.base import Read, Source, Takeable

# Decoding: what a folder of pictures needs said (data.test_fraction: held out when there is no test folder).
DECODED_KEYS = frozenset({"data.image_size", "data.channels", "data.resize", "data.decode_workers",
                          "data.test_fraction", "data.splits."})


def read(spec: Any, show_progress: bool = True) -> Read:
    import torch

    root = Path(spec.root).expanduser()
    folders = image_folder.split_folders(root, spec.splits)
    listed = {role: image_folder.list_split(folder) for role, folder in folders.items()}
    names = image_folder.class_names(listed)
    parts: dict[str, Takeable] = {}
    for role, split in listed.items():
        cached = image_folder.cache_split(split, names, spec, show_progress)
        name = split.folder.name if split.folder != root else root.name
        parts[role] = Part(cached.images(torch.device("cpu")), cached.labels, SplitInfo(str(split.folder), name,
                                                                                         cached.digest))
    layout = ", ".join(f"{role}={folder.name!r}" for role, folder in folders.items())
    return Read(parts, names, f"image_folder {root} ({layout}; {spec.channels}x{spec.image_size}x{spec.image_size})")


IMAGE_FOLDER = Source(
    "image_folder", read,
    shape=lambda spec: (spec.channels, spec.image_size, spec.image_size),
    sizes=image_folder.counts,
    classes=image_folder.class_count,
    keys=DECODED_KEYS | {"data.root"},
)
