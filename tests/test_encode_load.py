"""A trained model used after training: `vaelab.load(...)` from Python (encode, decode, sample, reconstruct,
its spec and classes), `vaelab encode` writing latents to .npz / .parquet, `vaelab sample --label` and
`vaelab reconstruct --label` taking class names, and every such command taking a bare run id. Real tiny
runs on generated data, a real MLflow store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import vaelab
from tests.conftest import REPO, make_idx_folder, tiny_run
from vaelab import cli
from vaelab.checkpoint import RUN_FILE, load_checkpoint
from vaelab.data import load_data
from vaelab.data.mnist_family import FASHION_CLASSES
from vaelab.errors import CheckpointError, UsageError
from vaelab.runner import run
from vaelab.tracking import Tracker

QUIET = {"figures": False, "iw_samples": 0, "probe": False}


@pytest.fixture(scope="module")
def cvae(tmp_path_factory, empty_mlflow_store: Path):
    """A conditional VAE trained on Fashion-MNIST-named IDX files, in a store of its own: (uri, run id, spec)."""
    folder = tmp_path_factory.mktemp("cvae")
    root = make_idx_folder(folder / "fashion")
    (folder / "store").mkdir()
    shutil.copyfile(empty_mlflow_store, folder / "store" / "mlflow.db")
    uri = f"sqlite:///{folder / 'store' / 'mlflow.db'}"
    spec = tiny_run(root, dataset="fashion_mnist", model={"conditional": True}, eval=QUIET)
    outcome = run(spec, "cvae_demo", Tracker(uri), show_progress=False)
    return uri, outcome.run_id, spec


@pytest.fixture
def vaelab_cli(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def call(*args: str) -> tuple[int, str, str]:
        code = cli.main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return call


def test_load_gives_a_model_to_encode_decode_and_sample_with_by_run_id_uri_or_folder(cvae, tmp_path: Path):
    uri, run_id, spec = cvae
    model = vaelab.load(run_id, tracking_uri=uri)
    assert model.classes == FASHION_CLASSES and model.conditional and model.run_spec.hash() == spec.hash()
    data = load_data(spec.data, torch.device("cpu"))
    images, labels = data.test.x.raw(slice(0, 6)).cpu(), data.test.y[:6]
    mu, logvar = model.encode(images, labels)  # uint8 in, scaled as training saw it
    assert mu.shape == logvar.shape == (6, spec.model.z_dim)
    same, _ = vaelab.load(f"runs:/{run_id}", tracking_uri=uri).encode(images.float() / 255, labels.tolist())
    torch.testing.assert_close(mu, same)
    folder = Tracker(uri).fetch_artifact(run_id, "checkpoint", tmp_path)
    assert folder is not None
    torch.testing.assert_close(vaelab.load(folder).encode(images, labels)[0], mu)

    by_name = model.encode(images, "Sneaker")[0]
    torch.testing.assert_close(by_name, model.encode(images, 7)[0])  # a class by name or by index
    assert model.decode(mu, labels).shape == (6, 1, 28, 28)
    assert model.sample(4, label="Bag").shape == (4, 1, 28, 28)
    assert model.reconstruct(images[:2], "Coat").shape == (2, 1, 28, 28)
    with pytest.raises(UsageError, match="needs a label.*Sneaker"):
        model.encode(images)  # a conditional model's code depends on the label: never assumed
    with pytest.raises(UsageError, match="expected a class name or index 0..9, got 'Boot'.*Ankle boot"):
        model.sample(2, label="Boot")
    with pytest.raises(CheckpointError, match="not a checkpoint folder, a models:/ or runs:/ URI, or an MLflow run"):
        vaelab.load("no-such-thing", tracking_uri=uri)


def test_import_vaelab_stays_free_of_torch():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", "import sys, vaelab; assert callable(vaelab.load); "
                           "print(sorted(m for m in ('torch', 'mlflow') if m in sys.modules))"],
                          capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == "[]"


def test_sample_and_reconstruct_take_a_run_id_and_class_names(cvae, vaelab_cli, tmp_path: Path):
    uri, run_id, _ = cvae
    code, out, err = vaelab_cli("sample", run_id, "--tracking-uri", uri, "--label", "Sneaker", "--n", "4",
                                "--out", "s.png")
    assert code == 0, err
    assert "class Sneaker" in out and (tmp_path / "s.png").is_file()
    code, _, err = vaelab_cli("sample", run_id, "--tracking-uri", uri, "--label", "Boots", "--out", "s.png")
    assert code == 2 and "--label: expected a class name or index 0..9, got 'Boots'" in err and "Ankle boot" in err

    Image.fromarray(np.full((40, 30), 200, np.uint8)).save(tmp_path / "photo.png")
    code, _, err = vaelab_cli("reconstruct", run_id, "photo.png", "--tracking-uri", uri, "--out", "r.png")
    assert code == 2 and "--label: this conditional model needs a label" in err and "7=Sneaker" in err
    assert not (tmp_path / "r.png").exists()
    for label in ("Trouser", "1"):
        code, _, err = vaelab_cli("reconstruct", run_id, "photo.png", "--tracking-uri", uri, "--label", label,
                                  "--out", "r.png")
        assert code == 0, err


def test_read_commands_name_a_missing_store_and_create_none(cvae, vaelab_cli, tmp_path: Path):
    _, run_id, _ = cvae
    code, _, err = vaelab_cli("sample", run_id, "--out", "s.png")  # from a folder without runs/
    assert code == 2 and "no tracking store at" in err and "--tracking-uri" in err
    assert not (tmp_path / "runs").exists()


def test_encode_writes_a_split_or_a_folder_as_npz_or_parquet(cvae, vaelab_cli, tmp_path: Path):
    uri, run_id, spec = cvae
    code, out, err = vaelab_cli("encode", run_id, "--tracking-uri", uri, "--split", "test", "--out", "test.npz")
    assert code == 0, err
    with np.load(tmp_path / "test.npz", allow_pickle=False) as saved:
        data = load_data(spec.data, torch.device("cpu"))
        assert set(saved.files) == {"mu", "logvar", "label", "index", "classes"}
        assert saved["mu"].shape == (len(data.test), spec.model.z_dim) and saved["mu"].dtype == np.float32
        np.testing.assert_array_equal(saved["label"], data.test.y.numpy())
        np.testing.assert_array_equal(saved["index"], np.arange(len(data.test)))
        assert tuple(saved["classes"]) == FASHION_CLASSES
        model = vaelab.load(run_id, tracking_uri=uri)
        mu, logvar = model.encode(data.test.x.raw(slice(0, 5)), data.test.y[:5])
        np.testing.assert_allclose(saved["mu"][:5], mu.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(saved["logvar"][:5], logvar.numpy(), rtol=1e-5, atol=1e-6)

    pictures = tmp_path / "pictures"
    (pictures / "sub").mkdir(parents=True)
    for i, name in enumerate(("a.png", "sub/b.jpg", "c.png")):
        Image.fromarray(np.full((32, 32), 40 * i, np.uint8)).save(pictures / name)
    (pictures / "broken.png").write_bytes(b"not an image")
    code, out, err = vaelab_cli("encode", run_id, "--tracking-uri", uri, "--images", "pictures", "--label", "Bag",
                                "--out", "pictures.parquet")
    assert code == 0, err
    assert "skipped 1 of 4 files" in err
    table = pq.read_table(tmp_path / "pictures.parquet").to_pydict()
    assert table["path"] == ["a.png", "c.png", "sub/b.jpg"]
    code, _, err = vaelab_cli("encode", run_id, "--tracking-uri", uri, "--images", "pictures/a.png", "--label", "Bag",
                              "--out", "one.npz")
    assert code == 0, err
    with np.load(tmp_path / "one.npz", allow_pickle=False) as saved:
        assert saved["path"].tolist() == ["a.png"] and saved["mu"].shape == (1, spec.model.z_dim)
    assert table["label"] == [8, 8, 8] and table["class"] == ["Bag"] * 3
    assert {f"mu_{j}" for j in range(spec.model.z_dim)} | {f"logvar_{j}" for j in range(spec.model.z_dim)} <= set(table)

    code, _, err = vaelab_cli("encode", run_id, "--tracking-uri", uri, "--images", "pictures", "--out", "x.npz")
    assert code == 2 and "needs a label" in err
    code, _, err = vaelab_cli("encode", run_id, "--tracking-uri", uri, "--out", "x.npz")
    assert code == 2 and "exactly one of --images" in err
    code, _, err = vaelab_cli("encode", run_id, "--tracking-uri", uri, "--split", "test", "--out", "x.csv")
    assert code == 2 and "--out: expected a .npz or .parquet file name" in err


def test_checkpoints_without_class_names_still_load_and_take_indices(cvae, tmp_path: Path):
    uri, run_id, _ = cvae
    folder = Tracker(uri).fetch_artifact(run_id, "checkpoint", tmp_path)
    record = json.loads((folder / RUN_FILE).read_text())
    assert folder is not None and record.pop("classes") == list(FASHION_CLASSES)
    (folder / RUN_FILE).write_text(json.dumps(record))  # as checkpoints written before names were recorded
    old = vaelab.load(folder)
    assert old.classes == tuple(str(i) for i in range(10))
    assert old.sample(2, label=7).shape == (2, 1, 28, 28)
    with pytest.raises(UsageError, match="got 'Sneaker'"):
        old.sample(2, label="Sneaker")
    (folder / RUN_FILE).write_text(json.dumps({**record, "classes": ["a", "a"]}))
    with pytest.raises(CheckpointError, match="run.json: classes: expected a list of distinct names"):
        load_checkpoint(folder)
    (folder / RUN_FILE).write_text(json.dumps({**record, "classes": ["a", "b"]}))
    with pytest.raises(CheckpointError, match="run.json: classes: 2 names for a model of 10 classes"):
        load_checkpoint(folder)
