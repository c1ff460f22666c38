"""Hugging Face data sets (vaelab.data.huggingface): save_to_disk folders, parquet files and
globs, the hub's local cache, split roles, image and label columns, and the fingerprint.

Every data set is built here from generated pixels; nothing is downloaded (the hub is offline
and every cache lives under tmp_path)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

datasets = pytest.importorskip("datasets")

from vaelab.data.huggingface import (  # noqa: E402  (after the importorskip)
    BOTH_MESSAGE,
    SPLIT_ALIASES,
    HFDataset,
    open_hf,
    recognise_splits,
)
from vaelab.errors import DataError  # noqa: E402

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}
FEATURES = {"image": datasets.Image(), "label": datasets.ClassLabel(names=["red", "blue"])}


@pytest.fixture(autouse=True)
def offline_hub(hf_offline: Path) -> Path:
    return hf_offline


# --------------------------------------------------------------------------- helpers


def pictures(n: int, seed: int = 0) -> tuple[list[np.ndarray], list[int]]:
    """n small RGB pictures (8..16 pixels a side), alternately 'red' and 'blue' with noise."""
    rng = np.random.default_rng(seed)
    arrays, labels = [], []
    for i in range(n):
        label = i % 2
        h, w = (int(s) for s in rng.integers(8, 17, size=2))
        base = np.array(COLOURS[("red", "blue")[label]], dtype=np.int16)
        noise = rng.integers(-20, 21, size=(h, w, 3))
        arrays.append(np.clip(base + noise, 0, 255).astype(np.uint8))
        labels.append(label)
    return arrays, labels


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


def image_dataset(n: int, seed: int = 0, arrays: list[np.ndarray] | None = None, **extra):
    made, labels = pictures(n, seed)
    arrays = made if arrays is None else arrays
    columns = {"image": [{"bytes": png(a), "path": None} for a in arrays], "label": labels[: len(arrays)], **extra}
    features = dict(FEATURES, **{k: datasets.Value("string") for k in extra})
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features)), arrays


def hf(**values) -> SimpleNamespace:
    fields = {"name": None, "revision": None, "path": None, "image_column": None, "label_column": None}
    return SimpleNamespace(**{**fields, **values})


def splits(train=None, val=None, test=None) -> SimpleNamespace:
    return SimpleNamespace(train=train, val=val, test=test)


def open_path(path: Path | str, split_names: SimpleNamespace | None = None, **values) -> HFDataset:
    return open_hf(hf(path=str(path), **values), split_names or splits())


def assert_same_pixels(split, arrays: list[np.ndarray]) -> None:
    assert len(split.images) == len(arrays)
    for data, array in zip(split.images, arrays, strict=True):
        assert isinstance(data, bytes)
        np.testing.assert_array_equal(decode(data), array)


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------- split roles


def test_split_names_are_recognised_by_role():
    assert recognise_splits(["train", "test"], {}, "x") == {"train": "train", "test": "test"}
    assert recognise_splits(["Training Data", "validation", "TEST"], {}, "x") == {
        "train": "Training Data", "val": "validation", "test": "TEST"}
    assert recognise_splits(["train_data", "dev", "testing-data"], {}, "x") == {
        "train": "train_data", "val": "dev", "test": "testing-data"}
    assert recognise_splits(["train", "eval"], {}, "x") == {"train": "train"}  # eval is no role's name
    assert all(isinstance(v, frozenset) for v in SPLIT_ALIASES.values())


def test_explicit_split_names_win_and_are_checked():
    explicit = {"train": "foo", "val": None, "test": "bar"}
    assert recognise_splits(["foo", "bar", "validation"], explicit, "x") == {
        "train": "foo", "val": "validation", "test": "bar"}
    # an explicitly used split is not recognised for a second role
    assert recognise_splits(["train", "validation"], {"train": "validation"}, "x") == {"train": "validation"}
    with pytest.raises(DataError, match="data.splits.test: no split 'nope' in x; it has: 'bar', 'foo'"):
        recognise_splits(["foo", "bar"], {"train": "foo", "test": "nope"}, "x")


def test_two_splits_for_one_role_and_no_train_are_errors():
    with pytest.raises(DataError, match="'train' and 'training' both look like the training split"):
        recognise_splits(["train", "training", "test"], {}, "x")
    with pytest.raises(DataError, match="found test=test but no training split among 'foo', 'test'"):
        recognise_splits(["foo", "test"], {}, "x")


# --------------------------------------------------------------------------- save_to_disk


def test_save_to_disk_dict(tmp_path: Path):
    train, train_arrays = image_dataset(12)
    test, test_arrays = image_dataset(6, seed=1)
    datasets.DatasetDict(train=train, test=test).save_to_disk(str(tmp_path / "saved"))

    opened = open_path(tmp_path / "saved")
    assert set(opened.splits) == {"train", "test"}
    assert opened.split_names == {"train": "train", "test": "test"}
    assert opened.class_names == ("red", "blue")
    assert opened.source == str((tmp_path / "saved").absolute())
    assert opened.image_column == "image" and opened.label_column == "label"
    split = opened.splits["train"]
    assert split.labels.dtype == np.int64 and split.labels.tolist() == [i % 2 for i in range(12)]
    assert opened.splits["test"].labels.tolist() == [i % 2 for i in range(6)]
    assert_same_pixels(split, train_arrays)
    assert_same_pixels(opened.splits["test"], test_arrays)
    # random access, slices and negative indices read only what they need
    np.testing.assert_array_equal(decode(split.images[5]), train_arrays[5])
    np.testing.assert_array_equal(decode(split.images[-1]), train_arrays[-1])
    assert [decode(b).shape for b in split.images[2:5]] == [a.shape for a in train_arrays[2:5]]
    assert len(split.images[::4]) == 3 and split.images[10:3] == []
    with pytest.raises(IndexError):
        split.images[12]
    assert split.names is not None and split.names[3] == "train[3]" and len(split.names) == 12
    assert list(split.names)[:2] == ["train[0]", "train[1]"]


def test_save_to_disk_of_one_dataset_is_the_train_split(tmp_path: Path):
    data, arrays = image_dataset(12)
    data.save_to_disk(str(tmp_path / "one"))
    opened = open_path(tmp_path / "one")
    assert set(opened.splits) == {"train"} and opened.split_names == {"train": "train"}
    assert_same_pixels(opened.splits["train"], arrays)
    with pytest.raises(DataError, match="splits.val: no split 'validation' in .*unsplit"):
        open_path(tmp_path / "one", splits(val="validation"))


def test_split_names_recognised_in_a_saved_dict(tmp_path: Path):
    parts = {name: image_dataset(4, seed=i)[0] for i, name in enumerate(("Training", "validation", "test"))}
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "saved"))
    opened = open_path(tmp_path / "saved")
    assert opened.split_names == {"train": "Training", "val": "validation", "test": "test"}
    assert opened.splits["val"].names is not None and opened.splits["val"].names[0] == "validation[0]"


def test_explicit_split_names(tmp_path: Path):
    parts = {name: image_dataset(4, seed=i)[0] for i, name in enumerate(("foo", "bar", "baz"))}
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "saved"))
    opened = open_path(tmp_path / "saved", splits(train="foo", test="baz"))
    assert opened.split_names == {"train": "foo", "test": "baz"}
    with pytest.raises(DataError, match=r"no train split \(splits: 'foo', 'bar', 'baz'\)") as excinfo:
        open_path(tmp_path / "saved")
    one_line_error(excinfo)
    with pytest.raises(DataError, match="splits.train: no split 'qux' in .*it has: 'bar', 'baz', 'foo'"):
        open_path(tmp_path / "saved", splits(train="qux"))


def test_ambiguous_split_names(tmp_path: Path):
    parts = {name: image_dataset(4, seed=i)[0] for i, name in enumerate(("train", "training", "test"))}
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match="'train' and 'training' both look like the training split"):
        open_path(tmp_path / "saved")
    assert open_path(tmp_path / "saved", splits(train="training")).split_names["train"] == "training"


# --------------------------------------------------------------------------- parquet


def write_parquet(data, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data.to_parquet(str(path))
    return path


def test_parquet_folder_with_split_files(tmp_path: Path):
    train, train_arrays = image_dataset(12)
    test, test_arrays = image_dataset(6, seed=1)
    write_parquet(train, tmp_path / "pq" / "train-00000-of-00001.parquet")
    write_parquet(test, tmp_path / "pq" / "test-00000-of-00001.parquet")
    (tmp_path / "pq" / "README.md").write_text("# tiny\n")
    opened = open_path(tmp_path / "pq")
    assert opened.split_names == {"train": "train", "test": "test"}
    assert opened.class_names == ("red", "blue")  # the ClassLabel survives parquet (schema metadata)
    assert_same_pixels(opened.splits["train"], train_arrays)
    assert_same_pixels(opened.splits["test"], test_arrays)
    assert opened.source == str((tmp_path / "pq").absolute())


def test_parquet_in_the_hubs_layout(tmp_path: Path):
    """data/<split>-00000-of-00001.parquet, as the hub stores datasets: validation -> val."""
    for i, split in enumerate(("train", "validation", "test")):
        write_parquet(image_dataset(4, seed=i)[0], tmp_path / "repo" / "data" / f"{split}-00000-of-00001.parquet")
    opened = open_path(tmp_path / "repo")
    assert opened.split_names == {"train": "train", "val": "validation", "test": "test"}
    assert all(len(s.images) == 4 for s in opened.splits.values())


def test_parquet_split_folders(tmp_path: Path):
    write_parquet(image_dataset(4)[0], tmp_path / "pq" / "train" / "part-0.parquet")
    write_parquet(image_dataset(4, seed=1)[0], tmp_path / "pq" / "train" / "part-1.parquet")
    write_parquet(image_dataset(3, seed=2)[0], tmp_path / "pq" / "test" / "part-0.parquet")
    opened = open_path(tmp_path / "pq")
    assert {role: len(s.images) for role, s in opened.splits.items()} == {"train": 8, "test": 3}


def test_parquet_split_folders_are_recognised_case_insensitively(tmp_path: Path):
    """datasets' own patterns are case-sensitive: it would put Training/, Valid/ and Testing/ all in train."""
    for i, (folder, n) in enumerate((("Training", 6), ("Valid", 2), ("Testing", 3), ("extra", 1))):
        write_parquet(image_dataset(n, seed=i)[0], tmp_path / "pq" / folder / "part-0.parquet")
    opened = open_path(tmp_path / "pq")
    assert opened.split_names == {"train": "Training", "val": "Valid", "test": "Testing"}
    assert {role: len(s.images) for role, s in opened.splits.items()} == {"train": 6, "val": 2, "test": 3}


def test_parquet_files_in_no_split_are_said(tmp_path: Path, capsys):
    write_parquet(image_dataset(4)[0], tmp_path / "pq" / "train.parquet")
    write_parquet(image_dataset(3, seed=1)[0], tmp_path / "pq" / "test.parquet")
    write_parquet(image_dataset(2, seed=2)[0], tmp_path / "pq" / "stray.parquet")
    opened = open_path(tmp_path / "pq")
    assert {role: len(s.images) for role, s in opened.splits.items()} == {"train": 4, "test": 3}
    assert "stray.parquet" in capsys.readouterr().err  # datasets drops it silently; vaelab says so


def test_parquet_files_without_split_names_are_train(tmp_path: Path):
    write_parquet(image_dataset(4)[0], tmp_path / "pq" / "a.parquet")
    write_parquet(image_dataset(4, seed=1)[0], tmp_path / "pq" / "b.parquet")
    opened = open_path(tmp_path / "pq")
    assert set(opened.splits) == {"train"} and len(opened.splits["train"].images) == 8


def test_parquet_glob(tmp_path: Path):
    train, train_arrays = image_dataset(12)
    write_parquet(train, tmp_path / "data" / "train-00000-of-00001.parquet")
    write_parquet(image_dataset(6, seed=1)[0], tmp_path / "data" / "test-00000-of-00001.parquet")
    opened = open_path(tmp_path / "data" / "*.parquet")
    assert opened.split_names == {"train": "train", "test": "test"}  # not all of it in train
    assert opened.source == str(tmp_path / "data" / "*.parquet")
    only_train = open_path(tmp_path / "data" / "train-*.parquet")
    assert set(only_train.splits) == {"train"}
    assert_same_pixels(only_train.splits["train"], train_arrays)
    with pytest.raises(DataError, match="no parquet files match"):
        open_path(tmp_path / "data" / "nothing-*.parquet")


def test_one_parquet_file_is_the_train_split(tmp_path: Path):
    data, arrays = image_dataset(12)
    path = write_parquet(data, tmp_path / "test.parquet")  # named like a split, but it is all there is
    opened = open_path(path)
    assert opened.split_names == {"train": "train"}
    assert_same_pixels(opened.splits["train"], arrays)


def test_not_a_parquet_file_and_missing_paths(tmp_path: Path):
    (tmp_path / "x.parquet").write_text("hello, I am text\n")
    with pytest.raises(DataError, match="x.parquet is not a readable parquet file") as excinfo:
        open_path(tmp_path / "x.parquet")
    one_line_error(excinfo)
    assert excinfo.value.__cause__ is None and excinfo.value.__suppress_context__
    write_parquet(image_dataset(4)[0], tmp_path / "folder" / "train.parquet")
    (tmp_path / "folder" / "test.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(DataError, match="test.parquet is not a readable parquet file"):
        open_path(tmp_path / "folder")
    with pytest.raises(DataError, match="no such file or folder") as excinfo:
        open_path(tmp_path / "missing")
    assert str(tmp_path / "missing") in one_line_error(excinfo)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither a save_to_disk folder .* nor a folder of parquet files"):
        open_path(tmp_path / "empty")


def test_image_paths_are_read_when_bytes_are_missing(tmp_path: Path):
    """A parquet file whose Image column holds paths (relative to the file) instead of bytes."""
    arrays, labels = pictures(4)
    (tmp_path / "pq" / "img").mkdir(parents=True)
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(tmp_path / "pq" / "img" / f"{i}.png")
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "image": pa.array([{"bytes": None, "path": f"img/{i}.png"} for i in range(4)], type=struct),
        "label": pa.array(labels, type=pa.int64()),
    })
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    metadata = {b"huggingface": json.dumps({"info": {"features": features.to_dict()}}).encode()}
    pq.write_table(table.replace_schema_metadata(metadata), tmp_path / "pq" / "train.parquet")
    opened = open_path(tmp_path / "pq")
    assert_same_pixels(opened.splits["train"], arrays)
    assert opened.splits["train"].names is not None and opened.splits["train"].names[2] == "train[2] (img/2.png)"
    (tmp_path / "pq" / "img" / "3.png").unlink()
    with pytest.raises(DataError, match=r"train\[3\]: the image file img/3.png does not exist"):
        opened.splits["train"].images[3]


# --------------------------------------------------------------------------- columns


def test_missing_image_and_label_columns(tmp_path: Path):
    image_dataset(4, caption=["a", "b", "c", "d"])[0].save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"data.hf.image_column: no column 'foo' in .*saved; "
                                        r"columns: image, label, caption") as excinfo:
        open_path(tmp_path / "saved", image_column="foo")
    one_line_error(excinfo)
    with pytest.raises(DataError, match=r"data.hf.label_column: no column 'bar' in .*; columns: image, label"):
        open_path(tmp_path / "saved", label_column="bar")
    with pytest.raises(DataError, match="column 'caption' .* holds .*string.*, not images"):
        open_path(tmp_path / "saved", image_column="caption")
    text_only = datasets.Dataset.from_dict({"text": ["a", "b"], "score": [1, 2]})
    text_only.save_to_disk(str(tmp_path / "text"))
    with pytest.raises(DataError, match="no image column .*; columns: text, score; set data.hf.image_column"):
        open_path(tmp_path / "text")


def test_raw_array_images_become_png(tmp_path: Path):
    rng = np.random.default_rng(3)
    rgb = [rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8) for _ in range(6)]
    grey = [rng.integers(0, 256, size=(9, 9)).tolist() for _ in range(6)]  # nested lists of int64
    features = datasets.Features({"pixels": datasets.Array3D((10, 12, 3), "uint8"),
                                  "grey": datasets.List(datasets.List(datasets.Value("int64"))),
                                  "label": datasets.Value("int64")})
    data = datasets.Dataset.from_dict({"pixels": rgb, "grey": grey, "label": [0, 1] * 3}, features=features)
    datasets.DatasetDict(train=data).save_to_disk(str(tmp_path / "arrays"))

    opened = open_path(tmp_path / "arrays")  # no Image column: the Array3D column is the images
    assert opened.image_column == "pixels"
    assert all(b.startswith(b"\x89PNG") for b in opened.splits["train"].images)
    assert_same_pixels(opened.splits["train"], rgb)
    greys = open_path(tmp_path / "arrays", image_column="grey")
    assert_same_pixels(greys.splits["train"], [np.array(g, dtype=np.uint8) for g in grey])
    assert greys.splits["train"].names is not None and greys.splits["train"].names[1] == "train[1]"


def test_raw_arrays_out_of_range_are_errors(tmp_path: Path):
    features = datasets.Features({"grey": datasets.List(datasets.List(datasets.Value("int64")))})
    datasets.Dataset.from_dict({"grey": [[[0, 300], [1, 2]]]}, features=features).save_to_disk(str(tmp_path / "a"))
    opened = open_path(tmp_path / "a", image_column="grey")
    with pytest.raises(DataError, match=r"train\[0\]: image arrays must hold uint8 values"):
        opened.splits["train"].images[0]


def test_string_labels(tmp_path: Path):
    arrays, _ = pictures(6)
    names = ["zebra", "ant", "moth", "ant", "zebra", "ant"]
    data = datasets.Dataset.from_dict({"img": [{"bytes": png(a), "path": None} for a in arrays], "species": names},
                                      features=datasets.Features({"img": datasets.Image(),
                                                                  "species": datasets.Value("string")}))
    test = data.select([0, 1])
    datasets.DatasetDict(train=data.select([1, 2, 3, 5]), test=test).save_to_disk(str(tmp_path / "s"))
    opened = open_path(tmp_path / "s", label_column="species")
    assert opened.class_names == ("ant", "moth", "zebra")  # from all splits, sorted
    assert opened.splits["train"].labels.tolist() == [0, 1, 0, 0]
    assert opened.splits["test"].labels.tolist() == [2, 0]
    assert opened.splits["train"].labels.dtype == np.int64


def test_integer_labels_and_no_labels(tmp_path: Path):
    arrays, _ = pictures(4)
    features = datasets.Features({"image": datasets.Image(), "labels": datasets.Value("int32")})
    data = datasets.Dataset.from_dict({"image": [{"bytes": png(a), "path": None} for a in arrays],
                                       "labels": [0, 1, 1, 0]}, features=features)
    data.save_to_disk(str(tmp_path / "ints"))
    opened = open_path(tmp_path / "ints")  # 'labels' is found by name
    assert opened.label_column == "labels" and opened.class_names == ("0", "1")
    assert opened.splits["train"].labels.tolist() == [0, 1, 1, 0]

    data.remove_columns("labels").save_to_disk(str(tmp_path / "plain"))
    plain = open_path(tmp_path / "plain")
    assert plain.label_column is None and plain.class_names == ("all",)
    assert plain.splits["train"].labels.tolist() == [0, 0, 0, 0] and plain.splits["train"].labels.dtype == np.int64


def test_unlabelled_class_label_rows_are_errors(tmp_path: Path):
    train, _ = image_dataset(4)
    test = train.cast_column("label", datasets.Value("int64")).map(lambda row: {"label": -1})
    test = test.cast_column("label", FEATURES["label"])
    datasets.DatasetDict(train=train, test=test).save_to_disk(str(tmp_path / "s"))
    with pytest.raises(DataError, match="split 'test' .* has 4 rows without a class in 'label' \\(label -1\\)"):
        open_path(tmp_path / "s")


# --------------------------------------------------------------------------- the hub


def test_name_or_path(tmp_path: Path):
    with pytest.raises(DataError) as excinfo:
        open_hf(hf(), splits())
    assert str(excinfo.value) == BOTH_MESSAGE
    with pytest.raises(DataError) as excinfo:
        open_hf(hf(name="a/b", path=str(tmp_path)), splits())
    assert str(excinfo.value) == BOTH_MESSAGE
    with pytest.raises(DataError, match="trust_remote_code"):
        open_hf(SimpleNamespace(name="a/b", path=None, trust_remote_code=True), splits())
    with pytest.raises(DataError, match="'imagefolder' is not a hub dataset name"):
        open_hf(hf(name="imagefolder"), splits())


def test_hub_name_offline_and_not_cached():
    with pytest.raises(DataError) as excinfo:
        open_hf(hf(name="someone/no-such-dataset", revision="v1"), splits())
    text = one_line_error(excinfo)
    assert "someone/no-such-dataset@v1" in text
    assert "not in the local cache" in text and "offline" in text


def cache_like_a_hub_download(parquet_dir: Path, repo_id: str, commit: str) -> Path:
    """Write what an online `load_dataset(repo_id)` leaves in HF_DATASETS_CACHE
    (<cache>/<owner>___<name>/default/0.0.0/<commit>/<name>-<split>.arrow + dataset_info.json),
    by running datasets' own parquet builder, configured the way its hub loader configures it,
    on local files. (The hub loader itself needs the network; the check that data files live
    in the repo is why repo_id is set after construction.)"""
    from datasets.data_files import DataFilesDict
    from datasets.load import configure_builder_class, import_main_class
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    builder_class = import_main_class(_PACKAGED_DATASETS_MODULES["parquet"][0])
    data_files = DataFilesDict.from_patterns({"train": ["train-*.parquet"], "test": ["test-*.parquet"]},
                                             base_path=str(parquet_dir))
    config = builder_class.BUILDER_CONFIG_CLASS(name="default", data_files=data_files)
    name = repo_id.split("/")[1]
    configured = configure_builder_class(builder_class, builder_configs=[config], default_config_name="default",
                                         dataset_name=name)
    builder = configured(dataset_name=name, config_name="default", hash=commit)
    builder.repo_id = repo_id
    builder._cache_dir = builder._build_cache_dir()
    builder.download_and_prepare()
    return Path(builder.cache_dir)


def test_hub_name_served_from_the_local_cache(tmp_path: Path, offline_hub: Path):
    train, train_arrays = image_dataset(12)
    write_parquet(train, tmp_path / "src" / "train-00000-of-00001.parquet")
    write_parquet(image_dataset(6, seed=1)[0], tmp_path / "src" / "test-00000-of-00001.parquet")
    commit = "0123456789abcdef0123456789abcdef01234567"
    cached = cache_like_a_hub_download(tmp_path / "src", "someone/tiny", commit)
    assert cached.is_relative_to(offline_hub) and (cached / "tiny-train.arrow").is_file()

    opened = open_hf(hf(name="someone/tiny"), splits())
    assert opened.source == f"hf://someone/tiny@{commit}"
    assert opened.split_names == {"train": "train", "test": "test"}
    assert opened.class_names == ("red", "blue")
    assert_same_pixels(opened.splits["train"], train_arrays)
    assert open_hf(hf(name="someone/tiny", revision=commit[:10]), splits()).fingerprint == opened.fingerprint
    # offline, datasets serves the latest cached copy whatever the revision: a commit that is not it is refused
    with pytest.raises(DataError, match=f"at commit {commit}, not fedcba9876"):
        open_hf(hf(name="someone/tiny", revision="fedcba9876"), splits())


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_follows_the_content(tmp_path: Path):
    data, arrays = image_dataset(12)
    data.save_to_disk(str(tmp_path / "a"))
    changed = [a.copy() for a in arrays]
    changed[7][3, 4, 0] ^= 1  # one pixel, one bit
    image_dataset(12, arrays=changed)[0].save_to_disk(str(tmp_path / "b"))
    first = open_path(tmp_path / "a")
    assert open_path(tmp_path / "a").fingerprint == first.fingerprint  # stable
    assert open_path(tmp_path / "b").fingerprint != first.fingerprint
    assert open_path(tmp_path / "a", label_column="label").fingerprint == first.fingerprint
    assert open_path(tmp_path / "a", splits(train="train")).fingerprint == first.fingerprint

    # the same paths rewritten with the changed pixel
    image_dataset(12, arrays=changed)[0].save_to_disk(str(tmp_path / "a"))
    assert open_path(tmp_path / "a").fingerprint not in (first.fingerprint, "")

    write_parquet(data, tmp_path / "pq" / "train.parquet")
    pq_first = open_path(tmp_path / "pq")
    assert open_path(tmp_path / "pq").fingerprint == pq_first.fingerprint
    write_parquet(image_dataset(12, arrays=changed)[0], tmp_path / "pq" / "train.parquet")
    pq_changed = open_path(tmp_path / "pq")
    assert pq_changed.fingerprint != pq_first.fingerprint
    assert_same_pixels(pq_changed.splits["train"], changed)  # not a stale copy from datasets' cache


def test_importing_the_module_does_not_import_datasets():
    import subprocess
    import sys

    code = "import sys, vaelab.data.huggingface; print('datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
