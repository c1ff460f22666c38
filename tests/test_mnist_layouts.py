"""MNIST and Fashion-MNIST found in the layouts people have on disk (torchvision's `MNIST/raw`,
given at either level), and a failure that says where it looked and why the download did not
help. Small IDX files written here; nothing touches the network (the download is replaced by one
that fails as torchvision's does offline)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import make_idx_folder, tiny_run
from vaelab.data import load_data, mnist_family
from vaelab.errors import DataError


@pytest.mark.parametrize(("dataset", "files_in", "root"), [
    ("mnist", "MNIST/raw", "MNIST"),                      # root is torchvision's MNIST folder: one level deep
    ("mnist", "MNIST/raw", "."),                          # root holds torchvision's MNIST folder
    ("mnist", "MNIST/raw", "MNIST/raw"),                  # root is the raw folder itself
    ("fashion_mnist", "FashionMNIST/raw", "FashionMNIST"),
    ("fashion_mnist", "FashionMNIST/raw", "."),
    ("mnist", "mnist", "."),                              # our own name
])
def test_the_idx_files_are_found_in_torchvision_layouts(tmp_path: Path, dataset: str, files_in: str, root: str):
    folder = make_idx_folder(tmp_path / files_in, n_train=50, n_test=20, gz=True)
    raw = mnist_family.load_raw(dataset, tmp_path / root, download=False)
    assert raw.origin == folder and len(raw.train_images) == 50 and len(raw.test_labels) == 20
    assert mnist_family.sizes(dataset, tmp_path / root) == {"train": 50, "test": 20}  # read from the headers


def test_a_run_trains_on_data_root_pointing_at_torchvisions_mnist_folder(tmp_path: Path):
    make_idx_folder(tmp_path / "MNIST" / "raw", n_train=60, n_test=20)
    run = tiny_run(tmp_path / "MNIST")
    data = load_data(run.data, torch.device("cpu"))
    assert len(data.train) + len(data.val) == 60 and len(data.test) == 20


def _offline_download(source, root: Path) -> None:
    """What torchvision raises when no mirror answers (its message lists each mirror on lines of their own)."""
    raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://ossci-datasets.s3.amazonaws."
                       "com/mnist/, got:\n<urlopen error [Errno -3] Temporary failure in name resolution>\n")


def test_nothing_found_and_no_download_says_why_and_where_it_looked(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(mnist_family, "_download", _offline_download)
    (tmp_path / "MNIST").mkdir()
    with pytest.raises(DataError) as err:
        mnist_family.load_raw("mnist", tmp_path / "MNIST", download=True)
    message = str(err.value)
    assert "\n" not in message
    assert "download" in message and "RuntimeError: Error downloading train-images-idx3-ubyte.gz" in message
    assert "Temporary failure in name resolution" in message  # the reason, not only the exception's type
    for looked in (tmp_path / "MNIST", tmp_path / "MNIST" / "raw", tmp_path / "MNIST" / "MNIST" / "raw"):
        assert str(looked) in message


def test_a_folder_with_some_of_the_files_is_named(tmp_path: Path):
    folder = make_idx_folder(tmp_path / "MNIST" / "raw", n_train=10, n_test=5)
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"MNIST/raw holds some but lacks t10k-labels-idx1-ubyte"):
        mnist_family.load_raw("mnist", tmp_path / "MNIST", download=False)


def test_fashion_mnist_does_not_read_the_digits_in_mnist_raw(tmp_path: Path, monkeypatch):
    """`.../MNIST/raw` holds digits: a fashion_mnist run pointed at `.../MNIST` must not label them clothes."""
    monkeypatch.setattr(mnist_family, "_download", _offline_download)
    digits = make_idx_folder(tmp_path / "MNIST" / "raw", n_train=10, n_test=5)
    try:  # found in the system's folder (Debian's dataset-fashion-mnist) or not found at all
        raw = mnist_family.load_raw("fashion_mnist", tmp_path / "MNIST", download=True)
    except DataError as err:
        assert "download" in str(err)
    else:
        assert raw.origin != digits
