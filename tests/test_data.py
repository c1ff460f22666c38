from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_idx_folder, tiny_run
from vaelab.data import DataError, load_data, seeded_split
from vaelab.data.idx import IdxError, read_idx, write_idx
from vaelab.data.store import ResidentImages


def test_idx_round_trip_plain_and_gzip(tmp_path: Path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        write_idx(tmp_path / name, array)
        np.testing.assert_array_equal(read_idx(tmp_path / name), array)


def test_truncated_or_foreign_idx_is_refused(tmp_path: Path):
    write_idx(tmp_path / "x", np.zeros((4, 5, 5), dtype=np.uint8))
    blob = (tmp_path / "x").read_bytes()
    (tmp_path / "short").write_bytes(blob[:-7])
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n" + blob)
    with pytest.raises(IdxError, match="size mismatch"):
        read_idx(tmp_path / "short")
    with pytest.raises(IdxError, match="bad magic"):
        read_idx(tmp_path / "png")


def test_mnist_from_user_files(tmp_path: Path):
    root = make_idx_folder(tmp_path / "flat", n_train=100, n_test=30)
    data = load_data(tiny_run(root).data, torch.device("cpu"))
    assert (len(data.train), len(data.val), len(data.test)) == (90, 10, 30)
    assert data.shape == (1, 28, 28)
    assert data.train.x.raw(slice(None)).dtype == torch.uint8  # bytes on the device, a quarter of floats
    batch = data.train.x[:10]
    assert batch.dtype == torch.float32 and 0.0 <= float(batch.min()) and float(batch.max()) <= 1.0
    assert data.test.y.dtype == torch.int64


def test_torchvision_layout_and_gz_are_found(tmp_path: Path):
    make_idx_folder(tmp_path / "MNIST" / "raw", gz=True, n_train=50, n_test=20)
    data = load_data(tiny_run(tmp_path).data, torch.device("cpu"))
    assert len(data.test) == 20


def test_missing_files_say_where_to_put_them(tmp_path: Path):
    with pytest.raises(DataError) as err:
        load_data(tiny_run(tmp_path / "empty").data, torch.device("cpu"))
    message = str(err.value)
    assert "train-images-idx3-ubyte" in message and str(tmp_path / "empty") in message
    assert "\n" not in message


def test_corrupt_file_is_a_data_error(tmp_path: Path):
    root = make_idx_folder(tmp_path / "bad", n_train=50, n_test=20)
    (root / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")
    with pytest.raises(DataError, match="size mismatch"):
        load_data(tiny_run(root).data, torch.device("cpu"))


def test_split_is_fixed_disjoint_and_independent_of_train_seed(tmp_path: Path):
    train, val = seeded_split(1000, 0.1, seed=0)
    again_train, again_val = seeded_split(1000, 0.1, seed=0)
    assert len(val) == 100 and len(train) == 900
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(range(1000))
    np.testing.assert_array_equal(val, again_val)
    assert not np.array_equal(seeded_split(1000, 0.1, seed=1)[1], val)

    root = make_idx_folder(tmp_path / "m", n_train=100, n_test=20)
    a = load_data(tiny_run(root).data, torch.device("cpu"))
    b = load_data(tiny_run(root, train={"seed": 9}).data, torch.device("cpu"))
    assert torch.equal(a.val.x[:], b.val.x[:])


def test_subset_takes_the_first_images(tmp_path: Path):
    root = make_idx_folder(tmp_path / "m", n_train=200, n_test=20)
    full = read_idx(root / "train-images-idx3-ubyte")
    run = tiny_run(root)
    data = load_data(dataclasses.replace(run.data, subset=50), torch.device("cpu"))
    assert len(data.train) + len(data.val) == 50
    first50 = {bytes(img) for img in full[:50]}
    assert {bytes((x[0] * 255).round().to(torch.uint8).numpy()) for x in data.val.x} <= first50


def test_shuffled_batches_cover_every_image_once():
    images = ResidentImages(torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1))
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    batches = list(images.shuffled(order, 4))
    assert [len(index) for index, _ in batches] == [4, 4, 2]
    assert sorted(torch.cat([index for index, _ in batches]).tolist()) == list(range(10))
    assert all(torch.equal(x.flatten() * 255, index.float()) for index, x in batches)


def test_real_fashion_mnist(fmnist_root: Path):
    run = tiny_run(fmnist_root, dataset="fashion_mnist")
    data = load_data(dataclasses.replace(run.data, subset=None), torch.device("cpu"))
    assert (len(data.train), len(data.val), len(data.test)) == (54000, 6000, 10000)
    assert data.class_names[9] == "Ankle boot"
    assert sorted(data.test.y.unique().tolist()) == list(range(10))


def test_download_is_tried_and_its_failure_is_one_line(tmp_path: Path):
    run = tiny_run(tmp_path / "nothing", data={"download": True})
    try:
        data = load_data(run.data, torch.device("cpu"))
    except DataError as err:  # offline (as here and in CI): one line that says where to put the files
        message = str(err)
        assert "download failed" in message and str(tmp_path / "nothing") in message
        assert "\n" not in message
    else:  # a machine with network gets real MNIST
        assert len(data.test) == 10_000
