"""Image folders: layouts, sizes, the cache, corrupt files, and the shipped landscapes spec."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO, make_pictures
from vaelab.data import DataError, load_data
from vaelab.data.augment import augment_batch
from vaelab.registry import ARCHITECTURES, LIKELIHOODS
from vaelab.runlog import MemoryRuns
from vaelab.runner import run
from vaelab.spec import apply_overrides, load_spec, parse_spec
from vaelab.training import fit, init_model


def data_spec(root: Path, tmp_path: Path, **extra):
    data = {"dataset": "image_folder", "root": str(root), "image_size": 32, "channels": 3,
            "cache_dir": str(tmp_path / "cache"), **extra}
    return parse_spec({"name": "f", "base": {"data": data}}).base.data


def test_one_folder_is_split_and_cached(tmp_path: Path, capsys):
    make_pictures(tmp_path / "pics", 40)
    (tmp_path / "pics" / "day" / "broken.png").write_bytes(b"not a png")
    spec = data_spec(tmp_path / "pics", tmp_path)
    data = load_data(spec, torch.device("cpu"))
    assert "broken.png" in capsys.readouterr().err
    assert len(data.train) + len(data.val) + len(data.test) == 40
    assert data.shape == (3, 32, 32) and data.class_names == ("day", "night")
    assert data.train.x[:].dtype == torch.float32 and float(data.train.x[:].max()) <= 1.0
    cached = list((tmp_path / "cache").glob("*.json"))
    assert len(cached) == 1
    again = load_data(spec, torch.device("cpu"))
    assert torch.equal(again.test.x[:], data.test.x[:])
    # A changed folder is a new cache entry, not stale data.
    make_pictures(tmp_path / "pics", 42, seed=1)
    assert len(load_data(spec, torch.device("cpu")).train) + len(data.val) > len(data.train)
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2


def test_train_test_layout_and_grey(tmp_path: Path):
    make_pictures(tmp_path / "set" / "train", 30)
    make_pictures(tmp_path / "set" / "test", 10, seed=2)
    data = load_data(data_spec(tmp_path / "set", tmp_path, channels=1, image_size=28), torch.device("cpu"))
    assert len(data.test) == 10 and len(data.train) + len(data.val) == 30
    assert data.shape == (1, 28, 28)


def test_empty_or_missing_folder_is_one_line(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    for root in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(DataError) as err:
            load_data(data_spec(root, tmp_path), torch.device("cpu"))
        assert str(root) in str(err.value) and "\n" not in str(err.value)


def test_augment_keeps_shape_and_range():
    x = torch.rand(8, 3, 32, 32)
    out = augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert not torch.equal(out, x)


def test_landscapes_example_trains_on_generated_pictures(tmp_path: Path):
    make_pictures(tmp_path / "landscapes", 48)
    spec = apply_overrides(load_spec(REPO / "experiments" / "landscapes_example.yaml"), [
        f"data.root={tmp_path / 'landscapes'}", f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=1",
        "train.device=cpu", "eval.iw_samples=4", "eval.tsne_points=20"])
    logs = MemoryRuns(tmp_path / "runs")
    outcome = run(spec.base, spec.name, logs, show_progress=False)
    assert logs.runs[outcome.run_id].status == "FINISHED"
    assert np.isfinite(outcome.metrics["test/nll_iw"])


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rgb") / "pics"
    make_pictures(root, 24)
    return root


@pytest.mark.parametrize("likelihood", sorted(LIKELIHOODS))
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_and_likelihood_at_64x64x3(arch, likelihood, rgb_folder: Path, tmp_path: Path):
    run = parse_spec({"name": "m", "base": {
        "data": {"dataset": "image_folder", "root": str(rgb_folder), "image_size": 64, "channels": 3,
                 "cache_dir": str(tmp_path / "cache")},
        "model": {"arch": arch, "z_dim": 4, "hidden": [32], "channels": [8, 16]},
        "loss": {"likelihood": likelihood}, "train": {"epochs": 1, "batch_size": 8, "device": "cpu"}}}).base
    data = load_data(run.data, torch.device("cpu"))
    model = init_model(run, data.shape, torch.device("cpu"))
    result = fit(run, model, data, show_progress=False)
    assert np.isfinite(result.history[0]["val/elbo"])
    assert model.decode(torch.zeros(1, 4)).shape == (1, 3, 64, 64)
