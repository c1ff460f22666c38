"""Data as researchers have it: split folders named as people name them, the run's
record of its data, and images resident or streamed with the same numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import tiny_run
from vaelab.cli import main
from vaelab.data import DataError, load_data
from vaelab.data.store import DiskImages, ResidentImages
from vaelab.runlog import MemoryRuns
from vaelab.runner import run
from vaelab.spec import parse_spec, with_values

CPU = torch.device("cpu")
COLOURS = {"coast": (30, 90, 200), "desert": (220, 190, 90), "forest": (20, 110, 30)}


def picture_folder(folder: Path, per_class: int, seed: int = 0, classes=tuple(COLOURS)) -> None:
    """Class folders of small non-square pictures: the class's colour, noise, a bright bar."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = np.clip(np.array(COLOURS[name]) + rng.normal(0, 25, (20, 24, 3)), 0, 255).astype(np.uint8)
            image[int(rng.integers(0, 16)) : , :3] = 255
            Image.fromarray(image).save(folder / name / f"{name} {i:03d}.png")


def kaggle_layout(root: Path, train: int = 16, val: int = 4, test: int = 5) -> Path:
    """What a Kaggle download unpacks to: splits named in words, each with class folders."""
    picture_folder(root / "Training Data", train, seed=0)
    picture_folder(root / "Validation Data", val, seed=1)
    picture_folder(root / "Testing Data", test, seed=2)
    return root


def data_spec(root: Path, tmp_path: Path, **extra):
    data = {"dataset": "image_folder", "root": str(root), "image_size": 28, "channels": 3,
            "cache_dir": str(tmp_path / "cache"), "decode_workers": 1, **extra}
    return parse_spec({"name": "f", "base": {"data": data}}).base.data


def test_a_kaggle_layout_keeps_its_splits_and_reads_classes_inside_them(tmp_path: Path):
    data = load_data(data_spec(kaggle_layout(tmp_path / "Landscape Classification"), tmp_path), CPU)
    # Split folders are splits, never classes: the three classes are the folders inside them.
    assert data.class_names == ("coast", "desert", "forest")
    assert (len(data.train), len(data.val), len(data.test)) == (48, 12, 15)
    assert sorted(torch.bincount(data.test.y).tolist()) == [5, 5, 5]
    assert data.val.info is not None and data.val.info.name == "Validation Data"
    assert data.train.x.raw(slice(None)).dtype == torch.uint8  # bytes on the device


@pytest.mark.parametrize(("names", "expected"), [
    (("train", "valid", "test"), (48, 12, 15)),
    (("training", "validation", "testing"), (48, 12, 15)),
    (("TRAIN_SET", "dev", "Test Set"), (48, 12, 15)),
])
def test_usual_split_names_are_recognised(tmp_path: Path, names, expected):
    for name, n, seed in zip(names, (16, 4, 5), (0, 1, 2), strict=True):
        picture_folder(tmp_path / "root" / name, n, seed=seed)
    data = load_data(data_spec(tmp_path / "root", tmp_path), CPU)
    assert (len(data.train), len(data.val), len(data.test)) == expected
    assert data.class_names == tuple(COLOURS)


def test_without_a_val_folder_val_is_held_out_of_train(tmp_path: Path):
    picture_folder(tmp_path / "root" / "Training", 20)
    picture_folder(tmp_path / "root" / "Testing", 5, seed=2)
    data = load_data(data_spec(tmp_path / "root", tmp_path, val_fraction=0.25), CPU)
    assert (len(data.train), len(data.val), len(data.test)) == (45, 15, 15)
    assert "held out" in data.val.info.name


def test_an_archive_unpacked_into_its_own_folder_is_looked_into(tmp_path: Path):
    kaggle_layout(tmp_path / "download" / "Landscape Classification")
    data = load_data(data_spec(tmp_path / "download", tmp_path), CPU)
    assert (len(data.train), len(data.val), len(data.test)) == (48, 12, 15)


def test_the_spec_names_split_folders_the_usual_names_miss(tmp_path: Path):
    picture_folder(tmp_path / "root" / "fit_on_these", 16)
    picture_folder(tmp_path / "root" / "held", 5, seed=2)
    spec = data_spec(tmp_path / "root", tmp_path, splits={"train": "fit_on_these", "test": "held"})
    data = load_data(spec, CPU)
    assert len(data.test) == 15 and data.class_names == tuple(COLOURS)
    with pytest.raises(DataError, match=r"data.splits.val: .*nope is not a folder"):
        load_data(data_spec(tmp_path / "root", tmp_path, splits={"train": "fit_on_these", "val": "nope"}),
                          CPU)


def test_two_folders_that_look_like_training_are_one_line_naming_both(tmp_path: Path, capsys):
    picture_folder(tmp_path / "root" / "train", 4)
    picture_folder(tmp_path / "root" / "Training Data", 4)
    picture_folder(tmp_path / "root" / "test", 2)
    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: amb\nbase:\n  data: {{dataset: image_folder, root: '{tmp_path / 'root'}', "
                    f"image_size: 28, cache_dir: '{tmp_path / 'cache'}'}}\n")
    assert main(["train", str(spec), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'Training Data' and 'train' both look like the training split" in err[0], err
    assert "data.splits.train" in err[0]


def test_a_test_folder_without_a_training_folder_is_an_error(tmp_path: Path):
    picture_folder(tmp_path / "root" / "test", 2)
    picture_folder(tmp_path / "root" / "other", 2)
    with pytest.raises(DataError, match="found test=.* but no training split"):
        load_data(data_spec(tmp_path / "root", tmp_path), CPU)


def test_empty_split_folders_and_ones_of_other_files_name_the_folder(tmp_path: Path):
    picture_folder(tmp_path / "a" / "train", 4)
    (tmp_path / "a" / "test").mkdir()
    with pytest.raises(DataError, match=r"a/test: no images .*it is empty"):
        load_data(data_spec(tmp_path / "a", tmp_path), CPU)
    picture_folder(tmp_path / "b" / "train", 4)
    (tmp_path / "b" / "test").mkdir()
    (tmp_path / "b" / "test" / "labels.csv").write_text("id,label\n")
    with pytest.raises(DataError, match=r"b/test: no images .*1 other files, e.g. labels.csv"):
        load_data(data_spec(tmp_path / "b", tmp_path), CPU)


def test_class_folders_in_one_split_but_not_another_are_an_error(tmp_path: Path):
    picture_folder(tmp_path / "root" / "train", 4)
    (tmp_path / "root" / "test").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "root" / "test" / "x.png")
    with pytest.raises(DataError, match="has class folders but .* has none"):
        load_data(data_spec(tmp_path / "root", tmp_path), CPU)


def _folder_run(root: Path, tmp_path: Path, **data):
    runspec = tiny_run(root, dataset="image_folder", model={"arch": "conv"},
                       eval={"batch_size": 7, "tsne_points": 0, "iw_samples": 4, "figures": False})
    values = {"data.image_size": 28, "data.cache_dir": str(tmp_path / "cache"), "data.decode_workers": 1,
              "train.batch_size": 10, **{f"data.{k}": v for k, v in data.items()}}
    return with_values(runspec, values)


def test_the_run_records_what_it_trained_on_as_datasets(tmp_path: Path):
    """What the run log is given (MLflow's dataset inputs are made of it: test_runlog)."""
    root = kaggle_layout(tmp_path / "Landscape Classification")
    logs = MemoryRuns(tmp_path / "runs")
    outcome = run(_folder_run(root, tmp_path), "landscapes", logs, show_progress=False)
    by_context = {d["context"]: d for d in logs.runs[outcome.run_id].datasets}
    assert set(by_context) == {"train", "validation", "test"}
    profiles = {context: d["profile"] for context, d in by_context.items()}
    assert [profiles[c]["images"] for c in ("train", "validation", "test")] == [48, 12, 15]
    assert profiles["test"]["classes"] == ["coast", "desert", "forest"]
    assert profiles["test"]["images_per_class"] == {"coast": 5, "desert": 5, "forest": 5}
    assert (profiles["train"]["channels"], profiles["train"]["height"], profiles["train"]["width"]) == (3, 28, 28)
    assert profiles["validation"]["split"] == "Validation Data"
    assert by_context["test"]["source"].endswith("Testing Data")
    # The digest is of the content: other pictures are another dataset, however the folder is named.
    other = tmp_path / "other" / "Landscape Classification"
    picture_folder(other / "Training Data", 16, seed=7)
    picture_folder(other / "Validation Data", 4, seed=1)
    picture_folder(other / "Testing Data", 5, seed=2)
    second = run(_folder_run(other, tmp_path), "landscapes", logs, show_progress=False)
    digests = {d["context"]: d["digest"] for d in logs.runs[second.run_id].datasets}
    assert digests["train"] != by_context["train"]["digest"] and digests["test"] == by_context["test"]["digest"]


def test_resident_and_streamed_runs_give_the_same_numbers(tmp_path: Path, capsys):
    root = kaggle_layout(tmp_path / "landscapes")
    logs = MemoryRuns(tmp_path / "runs")
    resident = run(_folder_run(root, tmp_path, storage="resident"), "res", logs, show_progress=False)
    # A budget smaller than the images: auto streams them from the cache, and says so.
    streamed = run(_folder_run(root, tmp_path, memory_budget=10_000), "str", logs, show_progress=False)
    assert "more than data.memory_budget" in capsys.readouterr().err
    a, b = logs.runs[resident.run_id].latest(), logs.runs[streamed.run_id].latest()
    for key in ("test/elbo", "test/nll_iw", "test/active_units", "test/probe_acc", "val/loss", "train/loss"):
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
    history = [[v for _, v in logs.runs[r].history("val/loss")] for r in (resident.run_id, streamed.run_id)]
    assert history[0] == pytest.approx(history[1], rel=1e-6)
    # Where the images live is how, not what: the same run, so it would resume either way.
    tags = [logs.runs[r].tags["vaelab.run_hash"] for r in (resident.run_id, streamed.run_id)]
    assert tags[0] == tags[1]


def test_stores_agree_on_every_way_of_indexing(tmp_path: Path):
    rng = np.random.default_rng(0)
    data = torch.from_numpy(rng.integers(0, 256, (37, 3, 4, 5), dtype=np.uint8))
    path = tmp_path / "images.u8"
    path.write_bytes(data.numpy().tobytes())
    resident, disk = ResidentImages(data), DiskImages(path, 37, (3, 4, 5), CPU)
    order = torch.randperm(37, generator=torch.Generator().manual_seed(3))
    for index in (slice(None), slice(5, 9), order[:11], torch.stack([order[:6], order[6:12]]), 4):
        assert torch.equal(resident[index], disk[index])
    assert torch.equal(resident[order], data[order].float() / 255)
    rows = np.array([30, 2, 2, 17])
    assert torch.equal(disk.subset(rows)[:], resident.subset(rows)[:])
    assert torch.equal(disk.subset(rows).subset(np.array([3, 0]))[:], data[[17, 30]].float() / 255)
    pairs = [list(store.shuffled(order, 8)) for store in (resident, disk)]
    assert len(pairs[0]) == 5 and all(torch.equal(i, j) and torch.equal(x, z)
                                      for (i, x), (j, z) in zip(*pairs, strict=True))
    streamed = list(disk.batches(range(0, 37, 10), 10, prefetch=2))
    assert torch.equal(torch.cat(streamed), resident[:])
    assert torch.equal(disk.resident(chunk=5).data, data)


def test_a_streamed_run_stopped_after_an_epoch_resumes_resident(tmp_path: Path):
    from vaelab.errors import RunStopped
    from vaelab.training.session import request_stop

    root = kaggle_layout(tmp_path / "landscapes")
    logs = MemoryRuns(tmp_path / "runs")
    runspec = with_values(_folder_run(root, tmp_path, storage="stream"), {"train.epochs": 3, "train.patience": None})
    reference = run(with_values(runspec, {"data.storage": "resident"}), "ref", logs, show_progress=False)

    def stop_after_first(epoch: int, _metrics: dict) -> None:
        if epoch == 1:
            request_stop()  # what a first Ctrl-C does: finish the epoch, save, stop

    with pytest.raises(RunStopped):
        run(runspec, "resumed", logs, show_progress=False, epoch_callbacks=[stop_after_first])
    resumed = run(with_values(runspec, {"data.storage": "resident"}), "resumed", logs, show_progress=False)
    record = logs.runs[resumed.run_id]
    assert record.tags["vaelab.resumed_from_epoch"] == "1"
    expected = logs.runs[reference.run_id].latest()
    for key in ("test/elbo", "val/loss", "train/loss"):
        assert record.latest()[key] == pytest.approx(expected[key], rel=1e-5), key


def test_folders_beside_the_splits_are_named_as_unused(tmp_path: Path, capsys):
    picture_folder(tmp_path / "root" / "train", 4)
    picture_folder(tmp_path / "root" / "test", 2)
    picture_folder(tmp_path / "root" / "extra_pictures", 2)
    data = load_data(data_spec(tmp_path / "root", tmp_path), CPU)
    assert len(data.test) == 6
    assert "extra_pictures not used (not a split folder" in capsys.readouterr().err


def test_named_splits_work_with_a_relative_root_and_silence_their_look_alikes(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("train", "Training Data", "test"):
        picture_folder(tmp_path / "ds" / name, 3)
    data = load_data(data_spec(Path("ds"), tmp_path, splits={"train": "train"}, val_fraction=0.2), CPU)
    assert len(data.train) + len(data.val) == 9 and len(data.test) == 9
    for name in ("fit", "val", "validation", "holdout"):
        picture_folder(tmp_path / "ds2" / name, 2)
    data = load_data(data_spec(Path("ds2"), tmp_path, splits={"train": "fit", "val": "holdout"}), CPU)
    assert data.val.info.name == "holdout"


def test_streamed_mnist_lives_on_the_run_device_and_its_bits_have_their_own_digest(mnist_root: Path, tmp_path: Path):
    def spec(**data):
        return tiny_run(mnist_root, data={"cache_dir": str(tmp_path / "cache"), **data}).data

    streamed = load_data(spec(storage="stream", binarize="static"), CPU)
    resident = load_data(spec(storage="resident", binarize="static"), CPU)
    assert isinstance(streamed.test.x, DiskImages) and isinstance(resident.test.x, ResidentImages)
    assert torch.equal(streamed.test.x[:], resident.test.x[:]) and torch.equal(streamed.train.x[:], resident.train.x[:])
    other_seed = load_data(spec(storage="stream", binarize="static", split_seed=1), CPU)
    assert other_seed.test.info.digest != streamed.test.info.digest  # other bits, another digest
    assert not torch.equal(other_seed.test.x[:], streamed.test.x[:])
    meta = torch.device("meta")  # a device other than the host: the streamed images must be read onto it
    placed = load_data(spec(storage="stream"), meta)
    assert placed.train.x.device == placed.train.y.device == meta


def test_disk_subsets_take_negative_rows_like_resident_ones(tmp_path: Path):
    data = torch.arange(5 * 3, dtype=torch.uint8).view(5, 3, 1, 1)
    (tmp_path / "i.u8").write_bytes(data.numpy().tobytes())
    disk = DiskImages(tmp_path / "i.u8", 5, (3, 1, 1), CPU)
    for rows in (np.array([-1, 0]), np.arange(5)[::-1]):
        assert torch.equal(disk.subset(rows)[:], ResidentImages(data).subset(rows)[:])
    with pytest.raises(IndexError):
        disk.subset(np.array([5]))
