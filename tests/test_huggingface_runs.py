"""Hugging Face datasets trained end to end from a spec, as a user runs them: a
save_to_disk folder and a folder of parquet files (both built here; nothing downloaded)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from vaelab.cli import main

datasets = pytest.importorskip("datasets")

CLASSES = ("sea", "sand")


def encoded(rng: np.random.Generator, label: int, fmt: str) -> bytes:
    colour = np.array(((20, 70, 200), (220, 190, 90))[label])
    image = np.clip(colour + rng.normal(0, 20, (int(rng.integers(20, 40)), 30, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(image).save(out, format=fmt)
    return out.getvalue()


def image_dataset_dict(n_train: int = 40, n_test: int = 12):
    rng = np.random.default_rng(0)
    features = datasets.Features({"img": datasets.Image(), "kind": datasets.ClassLabel(names=list(CLASSES))})

    def split(n: int):
        labels = [i % 2 for i in range(n)]
        images = [{"bytes": encoded(rng, label, "PNG" if i % 3 else "JPEG"), "path": None}
                  for i, label in enumerate(labels)]
        return datasets.Dataset.from_dict({"img": images, "kind": labels}, features=features)

    return datasets.DatasetDict({"train": split(n_train), "test": split(n_test)})


def spec_file(tmp_path: Path) -> Path:
    spec = tmp_path / "hf.yaml"
    spec.write_text(f"""name: hf_runs
base:
  data: {{dataset: huggingface, image_size: 28, channels: 3, cache_dir: '{tmp_path / "cache"}', decode_workers: 1,
         hf: {{image_column: img, label_column: kind}}}}
  model: {{arch: mlp, z_dim: 4, hidden: [32]}}
  loss: {{likelihood: gaussian, sigma: 0.2}}
  train: {{epochs: 2, batch_size: 16, device: cpu}}
  eval: {{tsne_points: 0, iw_samples: 4, figures: false}}
""")
    return spec


def train(tmp_path: Path, *sets: str) -> dict:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["train", str(spec_file(tmp_path)), "--tracking-uri", uri, "--no-progress"]
    for item in sets:
        args += ["--set", item]
    assert main(args) == 0
    client = MlflowClient(uri)
    (found,) = client.search_runs([client.get_experiment_by_name("hf_runs").experiment_id])
    return {"run": found, "inputs": {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset
                                     for i in found.inputs.dataset_inputs}}


def check_run(trained: dict, n_train: int, n_test: int) -> None:
    found, inputs = trained["run"], trained["inputs"]
    assert found.info.status == "FINISHED"
    assert np.isfinite(found.data.metrics["test/elbo"]) and "test/probe_acc" in found.data.metrics
    profiles = {context: json.loads(d.profile) for context, d in inputs.items()}
    assert profiles["train"]["images"] + profiles["validation"]["images"] == n_train
    assert profiles["test"]["images"] == n_test and profiles["test"]["classes"] == list(CLASSES)


def test_a_saved_dataset_trains_end_to_end(tmp_path: Path, hf_offline: Path):
    image_dataset_dict().save_to_disk(str(tmp_path / "saved"))
    trained = train(tmp_path, f"data.hf.path={tmp_path / 'saved'}")
    check_run(trained, 40, 12)
    assert trained["run"].data.params["data.hf.path"] == str(tmp_path / "saved")


def test_a_parquet_folder_trains_end_to_end(tmp_path: Path, hf_offline: Path):
    folder = tmp_path / "parquet" / "data"
    folder.mkdir(parents=True)
    for name, split in image_dataset_dict(30, 10).items():
        split.to_parquet(str(folder / f"{name}-00000-of-00001.parquet"))
    check_run(train(tmp_path, f"data.hf.path={tmp_path / 'parquet'}"), 30, 10)


def test_a_missing_column_is_one_line_and_exit_2(tmp_path: Path, hf_offline: Path, capsys):
    image_dataset_dict(8, 4).save_to_disk(str(tmp_path / "saved"))
    capsys.readouterr()  # datasets' own saving bars
    args = ["train", str(spec_file(tmp_path)), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--no-progress",
            "--set", f"data.hf.path={tmp_path / 'saved'}", "--set", "data.hf.image_column=picture"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.hf.image_column" in err[0] and "picture" in err[0], err
