"""Hugging Face image data sets: a hub name, a `save_to_disk` folder, or parquet files.

The only module of vaelab that imports `datasets` (lazily, inside functions, so importing
this module is cheap). `open_hf` hands the rest of vaelab, per split role (train / val /
test), an indexable sequence of *encoded* image bytes plus int64 labels; decoding is left
to the caller. Images stored as raw arrays are encoded as PNG on access. Nothing is
unpickled: `load_from_disk`, parquet and the hub cache are Arrow, and a data set's own
code is never run (no `trust_remote_code`).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np

from vaelab.data import layout
from vaelab.data.layout import ROLES, SPLIT_ALIASES
from vaelab.data.layout import normal_name as _normalise
from vaelab.errors import DataError

BOTH_MESSAGE = "data.hf: set data.hf.name (a hub dataset) or data.hf.path (a save_to_disk folder or parquet files)"
FINGERPRINT_VERSION = 1
_HEX = re.compile(r"[0-9a-f]{7,40}")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class HFSplit:
    images: Sequence[bytes]  # encoded image bytes, fetched lazily (len() and [i] without loading all)
    labels: np.ndarray  # int64 (N,)
    names: Sequence[str] | None = None  # per-image name for warnings: "train[17]", plus the file name if known


@dataclass(frozen=True)
class HFDataset:
    splits: dict[str, HFSplit]  # role ("train", "val", "test") -> split; train always present
    class_names: tuple[str, ...]  # a ClassLabel's names; else sorted unique label values; ("all",) without labels
    source: str  # "hf://owner/name@revision" or the resolved local path
    fingerprint: str  # changes when the content changes: for cache keys and MLflow digests
    split_names: dict[str, str]  # role -> the data set's own split name
    image_column: str = ""
    label_column: str | None = None


# --------------------------------------------------------------------------- split roles


def recognise_splits(names: Iterable[str], explicit: Mapping[str, str | None], what: str) -> dict[str, str]:
    """Roles (train / val / test) -> split names, as `vaelab.data.layout` recognises them; train is required."""
    names = list(names)
    found = layout.recognise_splits(names, explicit, what)
    layout.require_train(found, names, what)
    if "train" not in found:
        listed = ", ".join(repr(n) for n in names) or "none"
        raise DataError(f"{what}: no train split (splits: {listed}); set data.splits.train to one of them")
    return found


# --------------------------------------------------------------------------- lazy sequences


def _raw_array_to_png(value: Any, where: str) -> bytes:
    from PIL import Image

    array = np.asarray(value)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise DataError(f"{where}: an image array must be H×W or H×W×C with C in 1, 3, 4; got shape {array.shape}")
    if array.dtype != np.uint8:
        if array.dtype.kind not in "iub" or (array.size and (array.min() < 0 or array.max() > 255)):
            raise DataError(f"{where}: image arrays must hold uint8 values (0..255); got {array.dtype}")
        array = array.astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(out, format="PNG")
    return out.getvalue()


_BATCH = 256


class _Rows(Sequence[Any]):
    """A lazy view of one column of a split: [i] reads one row, slices and iteration read in batches."""

    def __init__(self, dataset: Any, column: str, kind: str, split: str, root: Path | None):
        self._dataset = dataset
        self._column = column
        self._kind = kind  # "image" ({"bytes", "path"} dicts), "array" (raw pixels) or "binary" (bytes)
        self._split = split
        self._root = root  # where relative image paths are looked up, besides the working directory

    def __len__(self) -> int:
        return int(self._dataset.num_rows)

    @overload
    def __getitem__(self, index: int) -> Any: ...

    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...

    def __getitem__(self, index: int | slice) -> Any:
        n = len(self)
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            return self._read(start, max(start, stop))
        i = index + n if index < 0 else index
        if not 0 <= i < n:
            raise IndexError(f"{self._split}[{index}]: index out of range ({n} images)")
        return self._read(i, i + 1)[0]

    def __iter__(self) -> Iterator[Any]:
        for start in range(0, len(self), _BATCH):
            yield from self._read(start, min(start + _BATCH, len(self)))

    def _read(self, start: int, stop: int) -> list[Any]:
        values = self._dataset[start:stop][self._column] if stop > start else []
        return [self._convert(value, start + offset) for offset, value in enumerate(values)]

    def _convert(self, value: Any, i: int) -> Any:
        raise NotImplementedError


class _ImageBytes(_Rows):
    def _convert(self, value: Any, i: int) -> bytes:
        where = f"{self._split}[{i}]"
        if value is None:
            raise DataError(f"{where}: no image (the value is missing)")
        if self._kind == "array":
            return _raw_array_to_png(value, where)
        if self._kind == "binary":
            return bytes(value)
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        path = value.get("path")
        if not path:
            raise DataError(f"{where}: the image has neither bytes nor a path")
        return self._file(Path(path), where)

    def _file(self, path: Path, where: str) -> bytes:
        candidates = [path] if path.is_absolute() or self._root is None else [path, self._root / path]
        for candidate in candidates:
            if candidate.is_file():
                try:
                    return candidate.read_bytes()
                except OSError as err:
                    raise DataError(f"{where}: cannot read {candidate} ({err.strerror or err})") from None
        raise DataError(f"{where}: the image file {path} does not exist")


class _ImageNames(_Rows):
    """"train[17]", with the image's file name when the data set kept one (its path only is read)."""

    _arrow: Any = None  # the split in Arrow format, made on first use

    def _read(self, start: int, stop: int) -> list[Any]:
        if self._kind != "image" or stop <= start:
            return [f"{self._split}[{i}]" for i in range(start, stop)]
        import pyarrow.compute as pc

        if self._arrow is None:
            self._arrow = self._dataset.with_format("arrow")
        table = self._arrow[start:stop]
        paths = pc.struct_field(table.column(self._column), "path").to_pylist()
        return [self._convert(path, start + offset) for offset, path in enumerate(paths)]

    def _convert(self, value: Any, i: int) -> str:
        return f"{self._split}[{i}] ({value})" if value else f"{self._split}[{i}]"


# --------------------------------------------------------------------------- loading


@dataclass
class _Loaded:
    splits: dict[str, Any]  # split name -> datasets.Dataset
    source: str
    unsplit: bool = False  # one Dataset, not a DatasetDict: the train split only
    root: Path | None = None  # where relative image paths are looked up
    saved: bool = False  # a save_to_disk folder (its Arrow files' stats go into the fingerprint)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


def _is_glob(text: str) -> bool:
    return glob.has_magic(text)


def _glob_base(pattern: str) -> Path:
    """The folder above the first part of `pattern` with a wildcard in it."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if _is_glob(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "dataset_info.json").is_file() and (folder / "state.json").is_file()
    )


def _is_visible(path: Path, base: Path) -> bool:
    try:
        parts = path.relative_to(base).parts
    except ValueError:
        parts = path.parts
    return not any(p.startswith((".", "__")) for p in parts)


def _parquet_files(path_text: str) -> tuple[list[Path], Path | None, str]:
    """The parquet files a path names, the folder splits are inferred under (None: one file,
    one split) and the source string."""
    path = Path(path_text).expanduser()
    if _is_glob(path_text) and not path.exists():
        pattern = str(path.absolute())
        base = _glob_base(pattern)
        files = sorted(Path(f) for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
        files = [f for f in files if f.suffix == ".parquet" and _is_visible(f, base)]
        if not files:
            raise DataError(f"data.hf.path: no parquet files match {pattern}")
        return files, base, pattern
    folder = path.absolute()
    files = sorted(f for f in folder.rglob("*.parquet") if f.is_file() and _is_visible(f, folder))
    if not files:
        raise DataError(
            f"data.hf.path: {folder} is neither a save_to_disk folder (dataset_dict.json, or dataset_info.json "
            "with state.json) nor a folder of parquet files"
        )
    return files, folder, str(folder)


def _split_folders(files: list[Path], base: Path) -> dict[str, list[str]] | None:
    """Split folders (base/<split>/...parquet) whose names vaelab recognises case-insensitively
    ("Training", "Test Data"), which datasets' case-sensitive patterns would merge into train."""
    groups: dict[str, list[str]] = {}
    for f in files:
        parts = f.relative_to(base).parts
        if len(parts) < 2:
            return None
        groups.setdefault(parts[0], []).append(f.as_posix())
    if len(groups) < 2 or not any(_normalise(n) in SPLIT_ALIASES["train"] for n in groups):
        return None
    return groups


def _parquet_splits(files: list[Path], base: Path | None) -> dict[str, list[str]]:
    """Which file goes into which split: recognised split folders, else as `load_dataset("parquet",
    data_dir=base)` infers it (split names in folder or file names, or the hub's
    data/<split>-00000-of-00001.parquet; its patterns are case-sensitive)."""
    if base is None:
        return {"train": [f.as_posix() for f in files]}
    by_folder = _split_folders(files, base)
    if by_folder is not None:
        return by_folder
    from datasets.data_files import DataFilesDict, get_data_patterns

    wanted = {f.as_posix() for f in files}
    try:
        patterns = get_data_patterns(base.as_posix())
        resolved = DataFilesDict.from_patterns(patterns, base_path=base.as_posix())
    except Exception as err:  # datasets raises FileNotFoundError, ValueError, ...
        raise DataError(f"data.hf.path: cannot tell the splits of {base} ({_first_line(err)})") from None
    result: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for split, split_files in resolved.items():
        chosen = [f for f in split_files if f in wanted]
        for f in chosen:
            if f in seen and seen[f] != str(split):
                raise DataError(f"data.hf.path: {f} belongs to both split {seen[f]!r} and {str(split)!r}")
            seen[f] = str(split)
        if chosen:
            result[str(split)] = chosen
    left = sorted(wanted - set(seen))
    if left:
        shown = ", ".join(left[:3]) + (f" and {len(left) - 3} more" if len(left) > 3 else "")
        print(f"vaelab: warning: data.hf.path: {len(left)} parquet file(s) belong to no split and are not used: "
              f"{shown}", file=sys.stderr)
    if not result:
        raise DataError(f"data.hf.path: no parquet files under {base} belong to a split")
    return result


def _check_parquet(files: Iterable[str]) -> None:
    import pyarrow.parquet as pq

    for f in files:
        try:
            pq.read_metadata(f)
        except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ...
            raise DataError(f"data.hf.path: {f} is not a readable parquet file ({_first_line(err)})") from None


def _load_parquet(files: list[Path], base: Path | None, source: str) -> _Loaded:
    import datasets

    data_files = _parquet_splits(files, base)
    _check_parquet(f for split_files in data_files.values() for f in split_files)
    try:
        loaded = datasets.load_dataset("parquet", data_files=data_files)
    except Exception as err:  # datasets wraps pyarrow's errors in DatasetGenerationError and others
        raise DataError(f"data.hf.path: cannot read the parquet files of {source} ({_first_line(err)})") from None
    return _Loaded(dict(loaded), source, unsplit=base is None, root=base if base is not None else files[0].parent)


def _load_local(path_text: str) -> _Loaded:
    path = Path(path_text).expanduser()
    if not path.exists() and not _is_glob(path_text):
        raise DataError(f"data.hf.path: {path.absolute()}: no such file or folder")
    if path.is_dir() and _is_saved_dataset(path):
        return _load_saved(path)
    if path.is_file():
        return _load_parquet([path.absolute()], None, str(path.absolute()))
    return _load_parquet(*_parquet_files(path_text))


def _load_saved(folder: Path) -> _Loaded:
    import datasets

    folder = folder.absolute()
    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as err:  # FileNotFoundError, JSON errors, ArrowInvalid, ...
        raise DataError(f"data.hf.path: cannot load the save_to_disk folder {folder} ({_first_line(err)})") from None
    if isinstance(loaded, datasets.Dataset):
        return _Loaded({"train": loaded}, str(folder), unsplit=True, root=folder, saved=True)
    return _Loaded(dict(loaded), str(folder), root=folder, saved=True)


def _is_offline() -> bool:
    import datasets

    return bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))


def _load_hub(name: str, revision: str | None, config: str | None) -> _Loaded:
    import datasets
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    if not _HUB_NAME.fullmatch(name) or name in _PACKAGED_DATASETS_MODULES or Path(name).exists():
        raise DataError(f"data.hf.name: {name!r} is not a hub dataset name (owner/dataset); "
                        "for local files set data.hf.path")
    shown = name + (f"@{revision}" if revision else "")
    try:
        loaded = datasets.load_dataset(name, config, revision=revision)
    except ConnectionError:
        cache = datasets.config.HF_DATASETS_CACHE
        if _is_offline():
            raise DataError(f"data.hf.name: {shown} is not in the local cache ({cache}) and the machine is offline "
                            "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); load it once with network access") from None
        raise DataError(f"data.hf.name: cannot reach the Hugging Face Hub for {shown}, and it is not in the "
                        f"local cache ({cache})") from None
    except Exception as err:  # DatasetNotFoundError, a missing config name, pyarrow errors, ...
        raise DataError(f"data.hf.name: cannot load {shown} ({_first_line(err)})") from None
    if not isinstance(loaded, datasets.DatasetDict):
        raise DataError(f"data.hf.name: {shown} did not load as a set of splits ({type(loaded).__name__})")
    return _Loaded(dict(loaded), f"hf://{shown}")


def _cached_commit(dataset: Any) -> str | None:
    """The commit a hub data set's cache folder is named after (…/owner___name/config/version/commit/)."""
    for entry in getattr(dataset, "cache_files", None) or []:
        parent = Path(entry.get("filename", "")).parent.name
        if re.fullmatch(r"[0-9a-f]{40}", parent):
            return parent
    return None


def _hub_source(name: str, revision: str | None, dataset: Any) -> str:
    commit = _cached_commit(dataset)
    if revision and commit and _HEX.fullmatch(revision.lower()) and not commit.startswith(revision.lower()):
        raise DataError(f"data.hf.revision: the local copy of {name} is at commit {commit}, not {revision} "
                        "(offline, datasets serves the latest cached copy); load it once with network access")
    if revision and commit and not _HEX.fullmatch(revision.lower()) and _is_offline():
        print(f"vaelab: warning: data.hf.revision: offline, {name} is served from the cache at commit {commit}; "
              f"cannot check that this is {revision!r}", file=sys.stderr)
    return f"hf://{name}@{commit or revision or 'main'}"


# --------------------------------------------------------------------------- columns and labels


def _columns_text(features: Mapping[str, Any]) -> str:
    return ", ".join(features) or "none"


def _int_lists(feature: Any) -> bool:
    """Nested lists (2 or 3 deep) of integers: raw pixels."""
    from datasets import LargeList, List, Value

    depth = 0
    while isinstance(feature, (List, LargeList)):
        feature, depth = feature.feature, depth + 1
    return depth in (2, 3) and isinstance(feature, Value) and re.fullmatch(r"u?int\d+", feature.dtype) is not None


def _image_kind(feature: Any) -> str | None:
    from datasets import Array2D, Array3D, Image, Value

    if isinstance(feature, Image):
        return "image"
    if isinstance(feature, (Array2D, Array3D)) or _int_lists(feature):
        return "array"
    if isinstance(feature, Value) and feature.dtype in ("binary", "large_binary"):
        return "binary"
    return None


def _image_column(features: Mapping[str, Any], wanted: str | None, source: str) -> tuple[str, str]:
    """(column, kind): the named column, else the first Image column, else the first Array2D/Array3D."""
    from datasets import Array2D, Array3D, Image

    if wanted is not None:
        if wanted not in features:
            raise DataError(
                f"data.hf.image_column: no column {wanted!r} in {source}; columns: {_columns_text(features)}"
            )
        kind = _image_kind(features[wanted])
        if kind is None:
            raise DataError(f"data.hf.image_column: column {wanted!r} of {source} holds {features[wanted]}, not images "
                            "(a datasets.Image, an Array2D/Array3D or nested lists of uint8, or encoded bytes)")
        return wanted, kind
    for types, kind in ((Image, "image"), ((Array2D, Array3D), "array")):
        for column, feature in features.items():
            if isinstance(feature, types):
                return column, kind
    raise DataError(f"data.hf.image_column: {source} has no image column (a datasets.Image feature); "
                    f"columns: {_columns_text(features)}; set data.hf.image_column")


def _label_column(features: Mapping[str, Any], wanted: str | None, source: str) -> str | None:
    """The named column, else "label" or "labels", else the only ClassLabel column, else None."""
    from datasets import ClassLabel

    if wanted is not None:
        if wanted not in features:
            raise DataError(
                f"data.hf.label_column: no column {wanted!r} in {source}; columns: {_columns_text(features)}"
            )
        return wanted
    for column in ("label", "labels"):
        if column in features:
            return column
    class_labels = [c for c, f in features.items() if isinstance(f, ClassLabel)]
    return class_labels[0] if len(class_labels) == 1 else None


def _column_values(dataset: Any, column: str, where: str) -> np.ndarray:
    table = dataset.select_columns([column]).with_format("arrow")[:]
    values = table.column(column)
    if values.null_count:
        raise DataError(f"{where}: {values.null_count} of {len(values)} labels in column {column!r} are missing")
    return np.asarray(values.to_numpy(zero_copy_only=False))


# A column of strings is read as class names only while it looks like one: at most this many names, and on
# average at least 2 images per name. Captions or file names (60 strings over 60 rows) would otherwise become
# 60 one-image "classes", a probe accuracy of 0 and a conditional model with a useless label.
MAX_TEXT_CLASSES = 1000


def _check_text_classes(classes: int, rows: int, column: str, source: str) -> None:
    if classes > MAX_TEXT_CLASSES or 2 * classes > rows:
        raise DataError(f"data.hf.label_column: column {column!r} of {source} holds {classes} distinct strings over "
                        f"{rows} rows, free text rather than classes (a string column is read as classes when it has "
                        f"at most {MAX_TEXT_CLASSES} and no more than half as many as rows); set data.hf.label_column "
                        "to a column of classes, or cast this one to datasets.ClassLabel if it really is one")


def _labels(
    chosen: dict[str, tuple[str, Any]], column: str, source: str
) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """Per-role int64 labels and the class names, consistent across the splits."""
    from datasets import ClassLabel, Value

    feature = chosen["train"][1].features[column]
    values = {role: _column_values(ds, column, f"{source} {split}") for role, (split, ds) in chosen.items()}
    if isinstance(feature, ClassLabel):
        names = tuple(str(n) for n in feature.names)
        for role, (split, ds) in chosen.items():
            other = ds.features[column]
            if not isinstance(other, ClassLabel) or list(other.names) != list(feature.names):
                raise DataError(f"data.hf.label_column: split {split!r} of {source} has other classes in {column!r} "
                                f"than split {chosen['train'][0]!r}")
            bad = (values[role] < 0) | (values[role] >= len(names))
            if bad.any():
                raise DataError(f"data.hf.label_column: split {split!r} of {source} has {int(bad.sum())} rows "
                                f"without a class in {column!r} (label {int(values[role][bad][0])})")
        return {role: v.astype(np.int64) for role, v in values.items()}, names
    if not (isinstance(feature, Value) and re.fullmatch(r"u?int\d+|bool|string|large_string", feature.dtype)):
        raise DataError(f"data.hf.label_column: column {column!r} of {source} holds {feature}; labels must be a "
                        "ClassLabel, integers or strings")
    classes = np.unique(np.concatenate([v for v in values.values()]))
    if feature.dtype in ("string", "large_string"):
        _check_text_classes(len(classes), sum(len(v) for v in values.values()), column, source)
    return {role: np.searchsorted(classes, v).astype(np.int64) for role, v in values.items()}, tuple(
        str(c) for c in classes.tolist()
    )


# --------------------------------------------------------------------------- fingerprint


def _file_stats(dataset: Any) -> list[list[Any]]:
    stats = []
    for entry in getattr(dataset, "cache_files", None) or []:
        try:
            st = os.stat(entry["filename"])
            stats.append([entry["filename"], st.st_size, st.st_mtime_ns])
        except (OSError, KeyError):
            stats.append([str(entry), None, None])
    return stats


def _fingerprint(chosen: dict[str, tuple[str, Any]], image: str, label: str | None, local_files: bool) -> str:
    """datasets' fingerprint of each split (content- or commit-keyed), the columns and features; for
    save_to_disk folders also the Arrow files' sizes and times (a re-saved folder is new content)."""
    state: dict[str, Any] = {"version": FINGERPRINT_VERSION, "image": image, "label": label, "splits": {}}
    for role, (split, ds) in chosen.items():
        state["splits"][role] = {
            "split": split,
            "fingerprint": ds._fingerprint,
            "rows": ds.num_rows,
            "columns": list(ds.column_names),
            "features": ds.features.to_dict(),
            "files": _file_stats(ds) if local_files else None,
        }
    text = json.dumps(state, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- open


def _prepare(dataset: Any, column: str, kind: str) -> Any:
    """The split with only the image column, images as {"bytes", "path"} (not decoded), arrays as numpy."""
    import datasets

    dataset = dataset.select_columns([column])
    if kind == "image":
        return dataset.cast_column(column, datasets.Image(decode=False))
    if kind == "array":
        return dataset.with_format("numpy")
    return dataset


def _check_columns(chosen: dict[str, tuple[str, Any]], image: str, kind: str, label: str | None, source: str) -> None:
    for split, ds in chosen.values():
        missing = [c for c in (image, label) if c is not None and c not in ds.features]
        if missing:
            raise DataError(f"data.hf: split {split!r} of {source} has no column {missing[0]!r}; "
                            f"columns: {_columns_text(ds.features)}")
        if _image_kind(ds.features[image]) != kind:
            raise DataError(f"data.hf.image_column: split {split!r} of {source} stores {image!r} as "
                            f"{ds.features[image]}, unlike split {chosen['train'][0]!r}")


def _load(hf: Any) -> _Loaded:
    name, path = getattr(hf, "name", None), getattr(hf, "path", None)
    if getattr(hf, "trust_remote_code", None):
        raise DataError("data.hf.trust_remote_code: vaelab never runs a data set's own code; use a data set in "
                        "parquet or Arrow form")
    if (name is None) == (path is None):
        raise DataError(BOTH_MESSAGE)
    loaded = _load_hub(str(name), getattr(hf, "revision", None), getattr(hf, "config", None)) if name is not None \
        else _load_local(str(path))
    if not loaded.splits:
        raise DataError(f"data.hf: {loaded.source} has no splits")
    return loaded


def open_hf(hf: Any, splits: Any, show_progress: bool = True) -> HFDataset:
    """Open the data set `hf` names (hf.name on the hub, or hf.path on disk) and map its splits
    to roles (`splits.train` / `.val` / `.test`, each None to recognise it by name)."""
    import datasets

    if show_progress:  # datasets' own bars (preparing parquet, loading shards)
        datasets.enable_progress_bars()
    else:
        datasets.disable_progress_bars()
    loaded = _load(hf)
    source = loaded.source
    explicit = {role: getattr(splits, role, None) for role in ROLES} if splits is not None else {}
    what = f"data.hf: {source}" + (" (one unsplit set: the train split)" if loaded.unsplit else "")
    mapping = recognise_splits(loaded.splits, explicit, what)
    chosen = {role: (split, loaded.splits[split]) for role, split in mapping.items()}
    if getattr(hf, "name", None) is not None:
        source = _hub_source(str(hf.name), getattr(hf, "revision", None), chosen["train"][1])

    features = chosen["train"][1].features
    image, kind = _image_column(features, getattr(hf, "image_column", None), source)
    label = _label_column(features, getattr(hf, "label_column", None), source)
    _check_columns(chosen, image, kind, label, source)
    if label is None:
        labels = {role: np.zeros(ds.num_rows, dtype=np.int64) for role, (_, ds) in chosen.items()}
        class_names: tuple[str, ...] = ("all",)
    else:
        labels, class_names = _labels(chosen, label, source)

    result: dict[str, HFSplit] = {}
    for role, (split, ds) in chosen.items():
        prepared = _prepare(ds, image, kind)
        result[role] = HFSplit(
            images=_ImageBytes(prepared, image, kind, split, loaded.root),
            labels=labels[role],
            names=_ImageNames(prepared, image, kind, split, loaded.root),
        )
    return HFDataset(
        splits=result,
        class_names=class_names,
        source=source,
        fingerprint=_fingerprint(chosen, image, label, local_files=loaded.saved),
        split_names=dict(mapping),
        image_column=image,
        label_column=label,
    )
