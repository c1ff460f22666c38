"""Data sources (vaelab.data.sources) and what `assemble` does for all of them: every data key a
source is given changes what it names there or is refused by name; binarisation on every grey
source; split sizes known from the source without loading, equal to what loading gives.

Tiny data built here: fake IDX files (conftest), grey and RGB folders of PNGs, a grey Hugging Face
save_to_disk folder, and the rendered dSprites grid."""

from __future__ import annotations

import dataclasses
import io
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import REPO, make_idx_folder, make_pictures
from vaelab import registry
from vaelab.data import ImageData, load_data
from vaelab.data.splits import HELD_OUT_KEYS
from vaelab.errors import SpecError
from vaelab.spec import DataSpec, RunSpec, flatten, parse_run, to_dict, with_values

CPU = torch.device("cpu")
SOURCES = registry.names("dataset")
DATA_KEYS = [key for key in flatten(RunSpec()) if key.startswith("data.")]

# A value other than the default for every data key: a new key must be added here, and so be
# checked against every source below.
OTHER_VALUE: dict[str, Any] = {
    "data.root": "elsewhere", "data.download": False, "data.val_fraction": 0.3, "data.split_seed": 5,
    "data.subset": 7, "data.image_size": 32, "data.channels": 1, "data.resize": "stretch", "data.test_fraction": 0.3,
    "data.cache_dir": "other/cache", "data.splits.train": "fit", "data.splits.val": "dev", "data.splits.test": "exam",
    "data.hf.name": "owner/name", "data.hf.revision": "main", "data.hf.path": "saved", "data.hf.image_column": "img",
    "data.hf.label_column": "kind", "data.storage": "stream", "data.memory_budget": 1000, "data.decode_workers": 2,
    "data.augment": True, "data.binarize": "static",
}


def test_every_data_key_has_another_value_to_try():
    assert set(OTHER_VALUE) == set(DATA_KEYS) - {"data.dataset"}


@pytest.mark.parametrize("dataset", SOURCES)
@pytest.mark.parametrize("key", sorted(OTHER_VALUE))
def test_every_key_is_honoured_or_refused_by_name(dataset: str, key: str):
    """A spec names a source and sets one key: parsed, it is accepted exactly when the source
    honours the key (or the value asks nothing of it: download false), else one SpecError naming it."""
    raw = to_dict(with_values(RunSpec(), {"data.dataset": dataset}))
    *sections, last = key.split(".")
    node = raw
    for part in sections:
        node = node[part]
    node[last] = OTHER_VALUE[key]
    source = registry.source(dataset)
    try:
        run = parse_run(raw, path="")
    except SpecError as err:
        assert str(err).startswith(f"{key}: ") and "\n" not in str(err), err
        assert not source.honours(key, with_values(RunSpec(), {"data.dataset": dataset, key: OTHER_VALUE[key]}).data)
        return
    assert source.honours(key, run.data) or (key, OTHER_VALUE[key]) == ("data.download", False)


def test_the_key_docs_name_the_sources_that_honour_them():
    """A key's doc that starts 'a, b: ...' names exactly the sources that honour it; one that does not,
    every source (data.binarize, which depends on the channels, is tested on data below)."""
    docs = {f"data.{f.name}": f.metadata.get("doc", "") for f in dataclasses.fields(DataSpec)}
    for key, doc in docs.items():
        if key == "data.binarize" or not doc:
            continue
        listed = re.match(r"([a-z_]+(?:, [a-z_]+)*): ", doc)
        named = set(listed.group(1).split(", ")) if listed and set(listed.group(1).split(", ")) <= set(SOURCES) \
            else set(SOURCES)
        honouring = {name for name in SOURCES if registry.source(name).honours(key, DataSpec(dataset=name))}
        assert named == honouring, key


def test_sources_and_split_sizes_import_no_torch():
    code = ("import sys; from vaelab import registry; from vaelab.spec import DataSpec; "
            "print([registry.train_size(DataSpec(dataset=n, root='nowhere')) for n in ('mnist', 'dsprites')]); "
            "[registry.source(n) for n in registry.names('dataset')]; "
            "print(sorted(m for m in ('torch', 'datasets') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # 60,000 less 10% for val; the grid less 10% for test, less 10% of the rest for val
    assert done.stdout.splitlines() == ["[54000, 597197]", "[]"]


# --------------------------------------------------------------------------- tiny sources


def grey_png(rng: np.random.Generator, label: int) -> bytes:
    """A grey picture, wider than tall: a bright bar whose place depends on the class."""
    pixels = (rng.random((30, 40)) * 90).astype(np.uint8)
    pixels[5:25, 4 + 18 * label : 18 + 18 * label] = 220
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="PNG")
    return out.getvalue()


def grey_folder(root: Path, n: int = 30, splits: tuple[str, ...] = ()) -> Path:
    rng = np.random.default_rng(0)
    for split in splits or ("",):
        for i in range(n):
            folder = root / split / ("dark", "bright")[i % 2]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:03d}.png").write_bytes(grey_png(rng, i % 2))
    return root


def grey_hf(folder: Path) -> Path:
    import datasets

    rng = np.random.default_rng(1)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["dark", "bright"])})

    def split(n: int) -> Any:
        labels = [i % 2 for i in range(n)]
        images = [{"bytes": grey_png(rng, label), "path": None} for label in labels]
        return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)

    datasets.DatasetDict({"train": split(40), "test": split(12)}).save_to_disk(str(folder))
    return folder


@pytest.fixture
def specs(tmp_path: Path, request):
    """dataset -> a small data spec of that source (grey where the source decodes), with its own cache."""
    cache = str(tmp_path / "cache")
    decoded = {"image_size": 28, "channels": 1, "decode_workers": 1, "cache_dir": cache}

    def spec_for(dataset: str) -> DataSpec:
        if dataset == "mnist":
            return DataSpec(dataset="mnist", root=str(make_idx_folder(tmp_path / "idx")), download=False,
                            cache_dir=cache)
        if dataset == "image_folder":
            return DataSpec(dataset="image_folder", root=str(grey_folder(tmp_path / "grey")), **decoded)
        if dataset == "dsprites":
            return DataSpec(dataset="dsprites", root=str(tmp_path / "no-npz"), subset=200, test_fraction=0.0005,
                            cache_dir=cache)
        request.getfixturevalue("hf_offline")
        hf = dataclasses.replace(DataSpec().hf, path=str(grey_hf(tmp_path / "hf")))
        return DataSpec(dataset="huggingface", hf=hf, **decoded)

    return spec_for


def summary(data: ImageData) -> dict[str, Any]:
    return {"splits": {role: (len(s), s.info.name if s.info else "", s.info.digest if s.info else "")
                       for role, s in data.splits().items()},
            "shape": data.shape, "storage": data.storage, "augment": data.augment, "dynamic": data.dynamic_binarize}


LOADED = ["mnist", "image_folder", "huggingface", "dsprites"]


@pytest.mark.parametrize("dataset", LOADED)
def test_split_sizes_are_known_before_loading_and_are_what_loading_gives(dataset: str, specs):
    spec = specs(dataset)
    expected = registry.source(dataset).split_sizes(spec)
    data = load_data(spec, CPU, show_progress=False)
    assert {role: len(split) for role, split in data.splits().items()} == expected
    assert registry.train_size(spec) == len(data.train) and registry.image_shape(spec) == data.shape
    assert registry.num_classes(spec) == len(data.class_names)


# Keys whose effect shows in what is loaded (decode_workers, download and the hub's keys change how,
# not what; data.splits.* and data.hf.* columns have their own tests).
SHOWN = {"data.subset": 20, "data.val_fraction": 0.3, "data.split_seed": 5, "data.augment": True,
         "data.storage": "stream", "data.memory_budget": 1, "data.test_fraction": 0.3, "data.image_size": 32,
         "data.channels": 3, "data.resize": "stretch", "data.binarize": "static"}


@pytest.mark.parametrize("dataset", LOADED)
def test_every_honoured_key_changes_what_is_loaded(dataset: str, specs):
    spec = specs(dataset)
    source = registry.source(dataset)
    before = summary(load_data(spec, CPU, show_progress=False))
    tried = []
    for key, value in SHOWN.items():
        if dataset == "dsprites" and key == "data.test_fraction":
            value = 0.001  # the grid is large: keep the rendered test part small
        if dataset == "dsprites" and key == "data.subset":
            value = 100
        changed = dataclasses.replace(spec, **{key.removeprefix("data."): value})
        if changed == spec:  # this source's spec has that value already (channels 3 of the MNIST family)
            continue
        if not source.honours(key, changed):
            with pytest.raises(SpecError, match=f"^{re.escape(key)}: "):
                load_data(changed, CPU, show_progress=False)
            continue
        tried.append(key)
        try:
            assert summary(load_data(changed, CPU, show_progress=False)) != before, key
        except SpecError as err:  # a held-out key where the data has that part: refused once it is read
            assert key in HELD_OUT_KEYS and str(err).startswith(f"{key}: {value} does nothing"), err
    assert {"data.subset", "data.val_fraction", "data.split_seed", "data.storage", "data.augment"} <= set(tried)


@pytest.mark.parametrize("dataset", ["mnist", "image_folder", "huggingface"])
def test_binarize_draws_bits_on_every_grey_source(dataset: str, specs):
    spec = specs(dataset)
    grey = load_data(spec, CPU, show_progress=False)
    static = load_data(dataclasses.replace(spec, binarize="static"), CPU, show_progress=False)
    dynamic = load_data(dataclasses.replace(spec, binarize="dynamic"), CPU, show_progress=False)
    for role in ("train", "val", "test"):
        bits = static.splits()[role].x[:]
        assert set(bits.unique().tolist()) == {0.0, 1.0}, role
        assert len(bits) == len(grey.splits()[role])
        # the bits follow the grey levels: brighter pixels are white more often
        levels = grey.splits()[role].x[:]
        assert bits[levels > 0.8].mean() > 0.7 and bits[levels < 0.3].mean() < 0.35
    assert not static.dynamic_binarize and dynamic.dynamic_binarize
    # dynamic: evaluation sets binarised once (the same bits as static), training images stay grey
    assert torch.equal(dynamic.val.x[:], static.val.x[:]) and torch.equal(dynamic.test.x[:], static.test.x[:])
    assert torch.equal(dynamic.train.x[:], grey.train.x[:])
    again = load_data(dataclasses.replace(spec, binarize="static"), CPU, show_progress=False)
    assert summary(again) == summary(static)  # the same seed draws the same bits


def test_binarize_is_refused_by_name_on_rgb_images_and_on_dsprites(tmp_path: Path):
    make_pictures(tmp_path / "rgb", 12)
    for data, why in (({"dataset": "image_folder", "root": str(tmp_path / "rgb"), "binarize": "dynamic"},
                       "needs grey images and image_folder gives 3 channels; set data.channels: 1"),
                      ({"dataset": "huggingface", "binarize": "static"}, "huggingface gives 3 channels"),
                      ({"dataset": "dsprites", "binarize": "static"}, "dsprites images are binary already")):
        with pytest.raises(SpecError, match=f"^data.binarize: .*{re.escape(why)}"):
            parse_run({"data": data}, path="")
        built = dataclasses.replace(DataSpec(), **data)  # a spec built in code is held to the same rule
        with pytest.raises(SpecError, match="^data.binarize: "):
            load_data(built, CPU, show_progress=False)
    grey = parse_run({"data": {"dataset": "image_folder", "root": str(tmp_path / "rgb"), "binarize": "dynamic",
                               "channels": 1, "image_size": 28, "cache_dir": str(tmp_path / "cache")}}, path="")
    assert set(load_data(grey.data, CPU, show_progress=False).test.x[:].unique().tolist()) == {0.0, 1.0}


def test_a_folder_with_all_its_splits_refuses_the_keys_that_hold_parts_out(tmp_path: Path):
    root = grey_folder(tmp_path / "split", n=8, splits=("train", "val", "test"))
    spec = DataSpec(dataset="image_folder", root=str(root), image_size=28, channels=1, decode_workers=1,
                    cache_dir=str(tmp_path / "cache"))
    data = load_data(spec, CPU, show_progress=False)
    assert [len(s) for s in data.splits().values()] == [8, 8, 8]
    for key, value in (("val_fraction", 0.3), ("test_fraction", 0.3), ("split_seed", 4)):
        with pytest.raises(SpecError, match=f"^data.{key}: .* has its own train, val, test splits"):
            load_data(dataclasses.replace(spec, **{key: value}), CPU, show_progress=False)
    # with bits to draw, split_seed seeds them: honoured
    seeded = [load_data(dataclasses.replace(spec, binarize="static", split_seed=s), CPU, show_progress=False)
              for s in (0, 4)]
    assert not torch.equal(seeded[0].test.x[:], seeded[1].test.x[:])


def test_the_mnist_family_counts_its_files(tmp_path: Path):
    spec = DataSpec(dataset="mnist", root=str(make_idx_folder(tmp_path / "idx", n_train=240, n_test=80)))
    assert registry.source("mnist").split_sizes(spec) == {"train": 216, "val": 24, "test": 80}
    # no files yet: the official sizes
    assert registry.train_size(DataSpec(dataset="fashion_mnist", root=str(tmp_path / "none"))) == 54_000


def test_the_mnist_family_gives_the_numbers_it_gave_before_sources(tmp_path: Path):
    """Split rows, names and binarisation draws pinned to what the loader gave before the split into
    sources and `assemble` (digests of images and labels, so the pixels themselves are pinned)."""
    spec = DataSpec(dataset="mnist", root=str(make_idx_folder(tmp_path / "idx")), download=False, subset=150)
    pinned = {
        "none": {"train": (135, "train (first 150)", "95ecb7d5d0758711"),
                 "val": (15, "train (first 150) (held out 0.1 for val)", "033ebb1f25222f54"),
                 "test": (80, "t10k", "460dcd6b87b05fab")},
        "static": {"train": (135, "train (first 150)", "28276ee5772ee7ce"),
                   "val": (15, "train (first 150) (held out 0.1 for val)", "99b038f198ee5a49"),
                   "test": (80, "t10k", "b5741c74b88f4733")},
    }
    for binarize, splits in pinned.items():
        data = load_data(dataclasses.replace(spec, binarize=binarize), CPU, show_progress=False)
        got = {role: (len(s), s.info.name, s.info.digest[:16]) for role, s in data.splits().items() if s.info}
        assert got == splits, binarize
