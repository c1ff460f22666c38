"""Numbers that mislead without a word (issue 25): a conditional model's probe, a finished run trained again
and counted as a seed, labels that are no classes, and read commands that leave an empty store behind."""

from __future__ import annotations

import io
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.conftest import tiny_run
from vaelab.cli import main
from vaelab.errors import DataError, SpecError, TrackingError
from vaelab.evaluation.plan import describe
from vaelab.evaluation.stage import SKIPPED_TAG
from vaelab.report import aggregate, build_report, select_runs
from vaelab.runlog import MemoryRuns
from vaelab.runner import run
from vaelab.tracking import Store, Tracker

QUICK = {"figures": False, "iw_samples": 0, "tsne_points": 0}
HASH_TAG, COPY_TAG = "vaelab.run_hash", "vaelab.copy_of"  # what the runs are tagged with, as a user reads them


def spec_file(folder: Path, mnist_root: Path, name: str = "honest") -> Path:
    body = {"name": name, "base": {
        "data": {"dataset": "mnist", "root": str(mnist_root), "download": False},
        "model": {"z_dim": 3, "hidden": [32]},
        "train": {"epochs": 1, "batch_size": 64, "device": "cpu"},
        "eval": {**QUICK, "probe": False}}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


# --------------------------------------------------------------------------- a conditional model's probe


def test_a_conditional_models_probe_is_skipped_and_says_why(tmp_path: Path, mnist_root: Path):
    cvae = tiny_run(mnist_root, model={"conditional": True}, train={"epochs": 1}, eval={**QUICK, "probe": True})
    (line,) = [line for line in describe(cvae) if line.startswith("probe")]
    assert "skipped (model.conditional: the encoder is given the label" in line  # --dry-run's plan says so
    logs = MemoryRuns(tmp_path / "runs")
    run(cvae, "cvae", logs, show_progress=False)
    log = logs.only()
    assert "test/probe_acc" not in log.latest()  # it read 1.0: the label was the encoder's input
    assert "probe: model.conditional: the encoder is given the label" in log.tags[SKIPPED_TAG]
    # A finished run is found by its identity in memory too (what `vaelab train --no-track` asks).
    found = logs.latest_finished("cvae", cvae.hash())
    assert found is not None and found.run_id == log.run_id and found.metrics == log.latest()
    assert logs.latest_finished("cvae", "0" * 16) is None and logs.latest_finished("other", cvae.hash()) is None


# --------------------------------------------------------------------------- the same run trained again


def test_only_a_finished_run_of_the_hash_is_found(tracking_uri: str):
    tracker = Tracker(tracking_uri)
    running = tracker.open_run("e", "r", {HASH_TAG: "abc"})
    assert tracker.latest_finished("e", "abc") is None  # RUNNING: it resumes, it is not named
    running.end(KeyboardInterrupt())
    assert tracker.latest_finished("e", "abc") is None  # KILLED
    done = tracker.open_run("e", "r", {HASH_TAG: "abc"})
    done.log_metrics({"test/elbo": 12.5})
    done.end()
    found = tracker.latest_finished("e", "abc")
    assert found is not None and found.run_id == done.run_id and found.metrics == {"test/elbo": 12.5}
    assert tracker.latest_finished("e", "abd") is None and tracker.latest_finished("f", "abc") is None


def test_a_finished_identical_run_is_named_and_copies_count_once(sweep_cli, tmp_path: Path, mnist_root: Path):
    path = spec_file(tmp_path, mnist_root)
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")

    def runs() -> list:
        found = client.search_runs([client.get_experiment_by_name("honest").experiment_id],
                                   order_by=["attributes.start_time ASC"])
        assert all(r.info.status == "FINISHED" for r in found)
        return found

    assert sweep_cli("train", str(path), "--no-progress")[0] == 0
    (first,) = runs()
    code, out, _ = sweep_cli("train", str(path), "--no-progress")
    assert code == 0 and len(runs()) == 1  # not trained a second time
    assert f"run {first.info.run_id} of this very spec" in out and "not trained again (--again" in out
    assert len([line for line in out.splitlines() if "FINISHED" in line]) == 1  # named once, not twice
    code, out, _ = sweep_cli("train", str(path), "--no-progress", "--set", "train.keep_every=1")
    assert code == 0 and len(runs()) == 1 and "train.keep_every does not change a run's identity" in out
    assert f"test/elbo          {first.data.metrics['test/elbo']:.4f}" in out  # its numbers, as a run's end prints
    assert f"/runs/{first.info.run_id}" in out  # and its page

    code, out, _ = sweep_cli("train", str(path), "--no-progress", "--again")
    assert code == 0 and "not trained again" not in out
    old, copy = runs()
    assert old.info.run_id == first.info.run_id and copy.data.tags[COPY_TAG] == first.info.run_id
    assert copy.data.tags[HASH_TAG] == first.data.tags[HASH_TAG]

    # The report counts the copy and its original as one run, not two seeds with ± 0.00.
    assert sweep_cli("report", str(path))[0] == 0
    text = (tmp_path / "studies" / "honest" / "report.md").read_text()
    table = [line for line in text.split("## Results")[1].splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    (row,) = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]
    assert row[header.index("n")] == "1" and "±" not in row[header.index("test −ELBO (nats)")]
    assert "Copies collapsed:** 1 finished run repeats an identical run" in text


def test_runs_of_one_hash_are_one_seed_in_the_tables(tmp_path: Path):
    def row(i: int, seed: int, run_hash: str, elbo: float, end: int) -> dict:
        return {"run_id": f"{i:032d}", "status": "FINISHED", "run_name": f"r{i}", "start_time": 0, "end_time": end,
                "artifact_uri": "", "params.loss.beta": "1", "params.train.seed": str(seed),
                "metrics.test/elbo": elbo, f"tags.{HASH_TAG}": run_hash}

    # Seed 0 trained twice (a copy on a GPU need not match bit for bit), seed 1 once.
    frame = pd.DataFrame([row(0, 0, "h0", 100.0, 1000), row(1, 0, "h0", 104.0, 3000), row(2, 1, "h1", 102.0, 2000)])
    table = aggregate(select_runs("demo", "1", frame))
    assert table["n"].tolist() == [2]  # two seeds, not three runs
    assert table["test/elbo mean"].tolist() == [103.0]  # the latest finished copy of seed 0, and seed 1
    assert table["run_ids"].tolist() == [[f"{1:032d}", f"{2:032d}"]]
    assert "Copies collapsed:** 1 finished run repeats" in build_report(select_runs("demo", "1", frame),
                                                                        tmp_path).read_text()


# --------------------------------------------------------------------------- labels that are no classes


def test_a_conditional_model_on_unlabelled_images_is_refused_before_decoding(tmp_path: Path):
    folder = tmp_path / "flat"  # images, no class subfolders: one class
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(30):
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(folder / f"{i}.png")
    cvae = tiny_run(folder, dataset="image_folder", model={"conditional": True},
                    data={"cache_dir": str(tmp_path / "cache"), "image_size": 28, "channels": 1}, eval=QUICK)
    with pytest.raises(SpecError) as refused:
        run(cvae, "cvae", MemoryRuns(tmp_path / "runs"), show_progress=False)
    assert str(refused.value).startswith("model.conditional: a conditional VAE needs class labels, and "
                                         "data.dataset image_folder gives its images 1 class")
    assert not (tmp_path / "cache").exists()  # refused before any image was decoded


def _hf_folder(folder: Path, column: list[str]) -> Path:
    import datasets

    def png(i: int) -> bytes:
        out = io.BytesIO()
        Image.fromarray(np.full((8, 8), i * 4 % 255, dtype=np.uint8)).save(out, format="PNG")
        return out.getvalue()

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": [{"bytes": png(i), "path": None} for i in range(len(column))],
                                "caption": column}, features=features).save_to_disk(str(folder))
    return folder


def test_free_text_is_not_a_column_of_classes(tmp_path: Path, hf_offline: Path):
    from vaelab.data.huggingface import open_hf

    def opened(folder: Path):
        hf = SimpleNamespace(name=None, revision=None, path=str(folder), image_column=None, label_column="caption")
        return open_hf(hf, SimpleNamespace(train=None, val=None, test=None), show_progress=False)

    captions = _hf_folder(tmp_path / "captions", [f"a photo of thing {i}" for i in range(60)])
    with pytest.raises(DataError) as refused:
        opened(captions)
    assert str(refused.value).startswith("data.hf.label_column: column 'caption' of ")
    assert "holds 60 distinct strings over 60 rows, free text rather than classes" in str(refused.value)
    # Strings that name classes are classes.
    kinds = _hf_folder(tmp_path / "kinds", [("cat", "dog", "owl")[i % 3] for i in range(60)])
    assert opened(kinds).class_names == ("cat", "dog", "owl")


# --------------------------------------------------------------------------- reading makes no store


def test_read_commands_make_no_store(tmp_path: Path, mnist_root: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a folder where nothing was trained
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = spec_file(tmp_path, mnist_root)
    Image.new("L", (28, 28)).save(tmp_path / "digit.png")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    for command in (["sample", "runs:/0123456789abcdef/checkpoint", "--out", "x.png"],
                    ["reconstruct", "runs:/0123456789abcdef", "digit.png", "--out", "r.png"],
                    ["evaluate", "0123456789abcdef"], ["register", str(spec)], ["ui", "--port", port]):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert err.startswith("vaelab: error: ") and err.count("\n") == 1, command  # one line
        assert f"no tracking store at {tmp_path / 'runs' / 'mlflow.db'}" in err.replace("sqlite:///", ""), command
    assert main(["report", str(spec)]) == 2
    assert not (tmp_path / "runs").exists()

    empty = tmp_path / "empty.db"  # an empty file is no store either: opening it would write MLflow's schema
    empty.touch()
    with pytest.raises(TrackingError, match="no tracking store at"):
        Store(f"sqlite:///{empty}")
    assert empty.stat().st_size == 0

    # A writer makes the store it writes to.
    tracker = Tracker(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")
    assert not tracker.exists and not (tmp_path / "new").exists()
    tracker.open_run("made", "r").end()
    assert (tmp_path / "new" / "mlflow.db").is_file() and tracker.latest_finished("made", "x") is None
