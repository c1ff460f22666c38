"""Fashion-MNIST and MNIST from IDX files: find them, else download them.

Search order: `data.root` itself and the layouts torchvision and others leave under it
(`<root>/raw/` when root is torchvision's `MNIST` folder, `<root>/<dataset>/`,
`<root>/<Class>/raw/`), then the Debian data package folder, then a torchvision download
into `data.root` when `data.download` allows; what failed says where it looked and why the
download did not help.
"""

from __future__ import annotations

import functools
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vaelab.data.idx import IdxError, read_idx
from vaelab.errors import DataError

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class IdxDataset:
    name: str  # our dataset name
    torchvision_class: str  # torchvision.datasets class (and its folder name)
    system_dirs: tuple[str, ...]  # folders installed by OS packages
    class_names: tuple[str, ...]
    sizes: tuple[int, int] = (60_000, 10_000)  # the official train and test images


FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SOURCES = {
    "fashion_mnist": IdxDataset("fashion_mnist", "FashionMNIST", ("/usr/share/datasets/fashion-mnist",),
                                FASHION_CLASSES),
    "mnist": IdxDataset("mnist", "MNIST", (), tuple(str(d) for d in range(10))),
}


@dataclass(frozen=True)
class RawSplits:
    """uint8 images (N, 28, 28) and int64 labels for the official train and test splits."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    origin: Path
    class_names: tuple[str, ...]


def _find_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _file(folder: Path, stem: str) -> Path:
    """The IDX file `stem` (plain or .gz) of a folder already known to hold it."""
    found = _find_file(folder, stem)
    if found is None:
        raise DataError(f"{folder}: {stem} (or {stem}.gz) is missing")
    return found


def candidate_dirs(source: IdxDataset, root: Path) -> list[Path]:
    """Where a dataset's four IDX files may be, in the order looked at: `root` as given, one
    level into it (torchvision's `<root>/MNIST/raw/` when root is its `MNIST` folder), the
    layouts of torchvision (`<root>/FashionMNIST/raw/`) and of our own name, then system folders."""
    # root/raw only when root is this dataset's own folder: `.../MNIST/raw` holds digits, which a
    # fashion_mnist run must not read as clothes.
    own = root.name in (source.name, source.torchvision_class)
    found = [
        root,
        *([root / "raw"] if own else []),
        root / source.name,
        root / source.name / "raw",
        root / source.torchvision_class,
        root / source.torchvision_class / "raw",
        *(Path(d) for d in source.system_dirs),
    ]
    return list(dict.fromkeys(found))  # in order, once each


def _complete_dir(dirs: list[Path]) -> Path | None:
    for folder in dirs:
        if all(_find_file(folder, stem) for stem in FILES.values()):
            return folder
    return None


def _download(source: IdxDataset, root: Path) -> None:
    import torchvision.datasets as tvd

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)  # no network must fail fast, not hang
    try:
        getattr(tvd, source.torchvision_class)(str(root), train=True, download=True)
        getattr(tvd, source.torchvision_class)(str(root), train=False, download=True)
    finally:
        socket.setdefaulttimeout(previous)


def _one_line(err: BaseException) -> str:
    """An exception as one short line: its type and its message, lines joined (torchvision's
    download error lists each mirror it tried on lines of their own)."""
    message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    text = f"{type(err).__name__}: {message}" if message else type(err).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def _partial(dirs: list[Path]) -> str:
    """Where some of the four files are but not all (a download cut short, a file left out), in words."""
    for folder in dirs:
        missing = [stem for stem in FILES.values() if _find_file(folder, stem) is None]
        if 0 < len(missing) < len(FILES):
            return f"; {folder} holds some but lacks {', '.join(missing)}"
    return ""


def sizes(dataset: str, root: str | Path) -> dict[str, int]:
    """Images in the train and test files found (their label files' headers), without downloading;
    the official sizes when there are none yet."""
    source = SOURCES[dataset]
    folder = _complete_dir(candidate_dirs(source, Path(root)))
    try:
        if folder is not None:
            return {split: len(read_idx(_file(folder, FILES[f"{split}_labels"]))) for split in ("train", "test")}
    except (IdxError, DataError):
        pass  # loading says what is wrong with them
    return {"train": source.sizes[0], "test": source.sizes[1]}


@functools.lru_cache(maxsize=2)
def _read_folder(folder: Path, stamp: tuple[float, ...]) -> dict[str, np.ndarray]:
    """Decoded arrays of a folder; cached per process (sweeps train many runs on
    one dataset), keyed by the files' mtimes so a changed file is read again."""
    return {key: read_idx(_file(folder, stem)) for key, stem in FILES.items()}


def load_raw(dataset: str, root: str | Path, download: bool = True) -> RawSplits:
    source = SOURCES[dataset]
    root = Path(root)
    dirs = candidate_dirs(source, root)
    folder = _complete_dir(dirs)
    download_error = ""
    if folder is None and download:
        try:
            _download(source, root)
        except Exception as err:  # any network/IO failure means "not available": said, in one line
            download_error = f"; download failed: {_one_line(err)}"
        folder = _complete_dir(dirs)
    if folder is None:
        names = ", ".join(FILES.values())
        raise DataError(
            f"{dataset}: IDX files not found; put {names} (optionally .gz) in {root}/ "
            f"(searched {', '.join(str(d) for d in dirs)}){_partial(dirs)}{download_error}"
        )
    try:
        stamp = tuple(_file(folder, stem).stat().st_mtime for stem in FILES.values())
        arrays = _read_folder(folder, stamp)
    except IdxError as err:
        raise DataError(str(err)) from None
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match")
    return RawSplits(
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"].astype(np.int64),
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"].astype(np.int64),
        origin=folder,
        class_names=source.class_names,
    )
