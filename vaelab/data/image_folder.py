"""Folders of images (PNG, JPEG, ...) at any size, RGB or grey, as researchers have them.

Layouts: split folders named as people name them (`train/`, `Training Data/`,
`valid/`, `Testing Data/`..., or named by `data.splits`), else one folder split by
seed; each split holds class subfolders (labels) or images directly. A Kaggle
archive unpacked into one extra folder level is looked into. Each split is decoded
once, in parallel, into the uint8 cache (`vaelab.data.cache`), keyed by its files'
names, sizes and times and the decode settings, so later runs start at once.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vaelab.data.decode import EXTENSIONS, walk_images
from vaelab.data.layout import ROLES, recognise_splits, require_train
from vaelab.errors import DataError

if TYPE_CHECKING:
    from vaelab.data.cache import CachedSplit


@dataclass(frozen=True)
class FolderSplit:
    folder: Path
    files: list[Path]
    classes: list[str | None]  # the class folder of each file; None for images without one


def _warn(message: str) -> None:
    print(f"vaelab: warning: {message}", file=sys.stderr)


def _subfolders(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _has_images(folder: Path) -> bool:
    return any(p.is_file() and p.suffix.lower() in EXTENSIONS for p in folder.iterdir())


def _recognised(root: Path, explicit: dict[str, Path]) -> dict[str, Path]:
    named = {path.resolve() for path in explicit.values()}
    names = [n for n in _subfolders(root) if (root / n).resolve() not in named]
    # Roles the spec names are not looked for: their look-alikes are just unused folders.
    found = {role: root / name for role, name in recognise_splits(names, {}, str(root), skip=explicit).items()}
    found.update(explicit)
    require_train(found, names, str(root))
    return found


def split_folders(root: Path, splits: Any) -> dict[str, Path]:
    """role -> folder for the splits the root has; {"train": root} when it has none."""
    if not root.is_dir():
        raise DataError(f"{root}: no such image folder")
    explicit = {}
    for role in ROLES:
        given = getattr(splits, role, None)
        if given is not None:
            path = (root / Path(given).expanduser()).resolve()
            if not path.is_dir():
                raise DataError(f"data.splits.{role}: {path} is not a folder")
            explicit[role] = path
    found = _recognised(root, explicit)
    inner = _subfolders(root)
    if not found and len(inner) == 1 and not _has_images(root):
        nested = _recognised(root / inner[0], {})  # an archive unpacked into a folder of its own name
        if nested:
            root, found, inner = root / inner[0], nested, _subfolders(root / inner[0])
    used = {path.resolve() for path in found.values()}
    unused = [name for name in inner if (root / name).resolve() not in used] if found else []
    if unused:
        _warn(f"{root}: {', '.join(unused)} not used (not a split folder; name one with data.splits)")
    return found or {"train": root}


def list_split(folder: Path) -> FolderSplit:
    """The images of one split folder, with their class folder names."""
    classes = _subfolders(folder)
    files: list[Path] = []
    labels: list[str | None] = []
    others: list[Path] = []
    if classes:
        for name in classes:
            found, other = walk_images(folder / name)
            if not found:
                _warn(f"{folder / name}: class folder without images; it has no examples")
            files += found
            labels += [name] * len(found)
            others += other
        loose = sum(1 for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
        if loose:
            _warn(f"{folder}: {loose} images beside its class folders are not used (they have no class)")
    else:
        files, others = walk_images(folder)
        labels = [None] * len(files)
    if not files:
        held = (f"; it holds {len(others)} other files, e.g. {others[0].name}" if others else "; it is empty")
        raise DataError(f"{folder}: no images ({', '.join(sorted(EXTENSIONS))}){held}")
    return FolderSplit(folder, files, labels)


def class_names(splits: dict[str, FolderSplit]) -> tuple[str, ...]:
    labelled = {role for role, split in splits.items() if split.classes[0] is not None}
    if labelled and labelled != set(splits):
        with_classes = ", ".join(str(splits[r].folder) for r in sorted(labelled))
        without = ", ".join(str(splits[r].folder) for r in sorted(set(splits) - labelled))
        raise DataError(f"{with_classes} has class folders but {without} has none: labels would not match")
    if not labelled:
        return ("all",)
    return tuple(sorted({name for split in splits.values() for name in split.classes if name is not None}))


def cache_split(split: FolderSplit, names: tuple[str, ...], spec: Any, progress: bool = True) -> CachedSplit:
    """The split decoded into the cache (or found there), keyed by its files' names, sizes,
    modification times and labels."""
    from vaelab.data.cache import decoded  # torch: only once images are read, not to count them

    index = {name: i for i, name in enumerate(names)}
    labels = [index[c] if c is not None else 0 for c in split.classes]
    parts: list[object] = ["folder", *(_identity(path, label) for path, label in zip(split.files, labels, strict=True))]
    return decoded(split.files, labels, parts, spec, str(split.folder), progress=progress)


def _identity(path: Path, label: int) -> str:
    """A file's part of its split's cache key: its name, size, modification time and label."""
    try:
        stat = path.stat()
    except OSError as err:
        # A dangling symlink, or a file removed since the folder was listed: decoding skips it with
        # a warning naming it, like any unreadable file; the key notes it, so a file that comes back
        # is a new entry.
        return f"{path}|unreadable {err.errno}|{label}"
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{label}"


def _listed(spec: Any) -> dict[str, FolderSplit]:
    root = Path(spec.root).expanduser()
    return {role: list_split(folder) for role, folder in split_folders(root, spec.splits).items()}


def counts(spec: Any) -> dict[str, int]:
    """Image files per split (before held-out parts), without decoding; {"train": 0} without a folder."""
    try:
        return {role: len(split.files) for role, split in _listed(spec).items()}
    except DataError:
        return {"train": 0}


def class_count(spec: Any) -> int:
    """Classes the folder labels its images with (at least 1), without decoding anything."""
    try:
        return len(class_names(_listed(spec)))
    except DataError:
        return 1
