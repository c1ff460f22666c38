"""Evaluation as a stage: evaluators that do not apply are skipped with a note,
bits per dimension that mean something, and `vaelab evaluate` on finished runs,
with real training runs and real MLflow stores."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.conftest import tiny_run
from vaelab.cli import main
from vaelab.data import load_data
from vaelab.data.store import ResidentImages
from vaelab.evaluation.estimators import bits_per_dim
from vaelab.evaluation.evaluators import EVALUATORS, EvalContext
from vaelab.evaluation.iwae import iw_images
from vaelab.evaluation.stage import evaluate
from vaelab.runner import run
from vaelab.spec import with_values
from vaelab.tracking import Tracker
from vaelab.training import fit, init_model

CPU = torch.device("cpu")


def test_bits_per_dim_against_known_answers():
    pixels = 784
    # A fair coin per binary pixel: ln 2 nats each, one bit.
    assert bits_per_dim(pixels * math.log(2), pixels, discrete=True) == pytest.approx(1.0)
    # The uniform density on [0, 1] (NLL 0 nats) puts 1/256 on each 8-bit bin: 8 bits.
    assert bits_per_dim(0.0, pixels, discrete=False) == pytest.approx(8.0)
    # A density above 1 (negative NLL) is still a probability below 1 per bin.
    assert bits_per_dim(-pixels * math.log(4), pixels, discrete=False) == pytest.approx(6.0)


@pytest.fixture(scope="module")
def gaussian_model(tmp_path_factory):
    from tests.conftest import make_idx_folder

    root = make_idx_folder(tmp_path_factory.mktemp("idx") / "mnist")
    runspec = tiny_run(root, loss={"likelihood": "gaussian", "sigma": 0.1},
                       train={"epochs": 40, "batch_size": 32, "lr": 3e-3, "device": "cpu", "patience": None},
                       eval={"batch_size": 500, "iw_samples": 20, "iw_images": None})
    data = load_data(runspec.data, CPU)
    model = init_model(runspec, data.shape, CPU)
    result = fit(runspec, model, data, show_progress=False)
    return model, data, runspec, result


def test_a_density_gets_nonnegative_bits_per_dim(gaussian_model):
    model, data, runspec, result = gaussian_model
    out = evaluate(EvalContext(model, data, runspec, result.epochs_run), [EVALUATORS["iwae"]], show_progress=False)
    assert out.metrics["test/nll_iw"] < 0  # a density on [0, 1] with sigma 0.1: above 1 per pixel
    assert out.metrics["test/bits_per_dim"] > 0
    assert out.metrics["test/nll_iw_se"] > 0
    assert '"k": 20' in out.tags["vaelab.eval.iwae"] and '"images": 80' in out.tags["vaelab.eval.iwae"]


def test_each_evaluator_that_does_not_apply_is_skipped_with_its_reason(gaussian_model):
    model, data, runspec, result = gaussian_model
    off = with_values(runspec, {"eval.iw_samples": 0, "eval.probe": False})
    out = evaluate(EvalContext(model, data, off, result.epochs_run), show_progress=False)
    assert out.ran == ["elbo", "latents"]
    assert out.skipped == ["iwae: eval.iw_samples is 0", "probe: eval.probe is false",
                           "disentanglement: the data has no ground-truth factors (data.dataset: dsprites has)"]
    assert "test/elbo" in out.metrics and "test/nll_iw" not in out.metrics and "test/probe_acc" not in out.metrics
    one_class = dataclasses.replace(data, train=dataclasses.replace(data.train, y=torch.zeros_like(data.train.y)))
    out = evaluate(EvalContext(model, one_class, runspec, result.epochs_run), [EVALUATORS["probe"]],
                   show_progress=False)
    assert out.skipped == ["probe: the data has fewer than 2 classes (no labels to probe)"]
    assert out.tags["vaelab.eval.skipped"] == out.skipped[0]


def test_the_default_iwae_subset_costs_no_more_than_training(gaussian_model):
    model, data, runspec, _ = gaussian_model
    capped = with_values(runspec, {"eval.iw_samples": 1000, "eval.iw_images": 1000, "eval.iw_capped": True})
    # 2 epochs over 216 training images: 3 * 2 * 216 passes buy 1 image at k=1000, floored at 100 (all 80 here).
    assert iw_images(EvalContext(model, data, capped, epochs_run=2).facts) == 80
    repeated = ResidentImages(data.test.x.raw(slice(None)).repeat(20, 1, 1, 1))
    big = dataclasses.replace(data, test=dataclasses.replace(data.test, x=repeated, y=data.test.y.repeat(20)))
    assert iw_images(EvalContext(model, big, capped, epochs_run=2).facts) == 100
    assert iw_images(EvalContext(model, big, with_values(capped, {"eval.iw_capped": False}), 2).facts) == 1000
    assert iw_images(EvalContext(model, big, with_values(capped, {"eval.iw_images": None, "eval.iw_capped": False}),
                                 2).facts) == 1600


def _flat_folder(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", n // 4), ("test", n // 4)):
        (root / split).mkdir(parents=True)
        for i in range(count):
            image = (rng.random((20, 24, 3)) * 255).astype(np.uint8)
            image[: 10 + i % 5] = (200, 120, 40)
            Image.fromarray(image).save(root / split / f"img{i:03d}.png")


def test_a_flat_image_folder_trains_and_evaluates_without_the_probe(tmp_path: Path, tracking_uri: str, capsys):
    _flat_folder(tmp_path / "pictures", 48)
    runspec = tiny_run(tmp_path / "pictures", dataset="image_folder",
                       eval={"batch_size": 500, "tsne_points": 0, "iw_samples": 5, "figures": False})
    runspec = with_values(runspec, {"data.image_size": 28, "data.cache_dir": str(tmp_path / "cache"),
                                    "model.arch": "conv"})
    outcome = run(runspec, "flat", Tracker(tracking_uri), show_progress=False)
    record = MlflowClient(tracking_uri).get_run(outcome.run_id)
    assert record.info.status == "FINISHED"
    for key in ("test/elbo", "test/recon", "test/kl", "test/mse", "test/nll_iw", "test/nll_iw_se",
                "test/bits_per_dim", "test/active_units", "time/eval/iwae_s"):
        assert key in record.data.metrics, key
    assert "test/probe_acc" not in record.data.metrics
    assert "probe: the data has fewer than 2 classes" in record.data.tags["vaelab.eval.skipped"]
    # Asked for by name, an evaluator the data cannot support is an error, and nothing is written.
    assert main(["evaluate", outcome.run_id, "--metrics", "probe", "--tracking-uri", tracking_uri,
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--metrics probe: does not apply" in err[0], err
    assert MlflowClient(tracking_uri).get_run(outcome.run_id).data.metrics == record.data.metrics


@pytest.fixture
def finished(tmp_path: Path, mnist_root: Path, tracking_uri: str, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "experiments").mkdir()
    runspec = tiny_run(mnist_root, eval={"batch_size": 500, "tsne_points": 0, "iw_samples": 5, "figures": False})
    outcomes = [run(with_values(runspec, {"train.seed": s}), "later", Tracker(tracking_uri), show_progress=False)
                for s in (0, 1, 2)]
    (tmp_path / "experiments" / "later.yaml").write_text(f"name: later\nbase: {{data: {{root: {mnist_root}}}}}\n")
    return outcomes


def _history(uri: str, run_id: str, key: str) -> list[float]:
    return [m.value for m in MlflowClient(uri).get_metric_history(run_id, key)]


def test_evaluate_adds_a_k_marked_nll_to_a_run_once(finished, tracking_uri: str, capsys):
    run_id = finished[0].run_id
    before = MlflowClient(tracking_uri).get_run(run_id).data.metrics
    args = ["evaluate", run_id, "--set", "eval.iw_samples=40", "--tracking-uri", tracking_uri, "--no-progress"]
    assert main(args) == 0
    record = MlflowClient(tracking_uri).get_run(run_id)
    assert record.info.status == "FINISHED"
    assert record.data.metrics["test/nll_iw"] == before["test/nll_iw"]  # the run's own estimate is untouched
    assert record.data.metrics["test/nll_iw_k40"] <= before["test/nll_iw"] + 1.0  # a tighter bound, all images
    assert '"k": 40' in record.data.tags["vaelab.eval.iwae_k40"]
    assert "test/nll_iw_k40" in capsys.readouterr().out
    assert main(args) == 0  # again: nothing is computed or logged twice
    assert "nothing new" in capsys.readouterr().out
    assert len(_history(tracking_uri, run_id, "test/nll_iw_k40")) == 1
    # The checkpoint folder names its run: the same evaluation from the folder is already done.
    folder = finished[0].checkpoint_dir
    assert main(["evaluate", str(folder), "--set", "eval.iw_samples=40", "--tracking-uri", tracking_uri,
                 "--no-progress", "--metrics", "iwae"]) == 0
    assert len(_history(tracking_uri, run_id, "test/nll_iw_k40")) == 1


def test_evaluate_a_study_evaluates_exactly_its_top_runs(finished, tracking_uri: str):
    assert main(["evaluate", "later", "--top", "2", "--by", "val/elbo", "--set", "eval.iw_samples=7",
                 "--metrics", "iwae", "--tracking-uri", tracking_uri, "--no-progress"]) == 0
    by_elbo = sorted(finished, key=lambda o: o.metrics["best/val/elbo"])
    marked = [o.run_id for o in finished if _history(tracking_uri, o.run_id, "test/nll_iw_k7")]
    assert sorted(marked) == sorted(o.run_id for o in by_elbo[:2])


@pytest.mark.parametrize("args, message", [
    (["RUN", "--metrics", "fid"], "--metrics: unknown evaluator 'fid'"),
    (["RUN", "--set", "model.z_dim=3"], "only eval.* keys can change after training"),
    (["RUN", "--set", "eval.iw_samples=-1"], "eval.iw_samples"),
    (["0" * 32], "no such MLflow run"),
    (["nothing-here", "--top", "2"], "no such spec file"),
])
def test_bad_evaluation_input_is_one_line_and_exit_2(finished, tracking_uri: str, capsys, args, message):
    args = [finished[0].run_id if a == "RUN" else a for a in args]
    before = MlflowClient(tracking_uri).get_run(finished[0].run_id).data.metrics
    assert main(["evaluate", *args, "--tracking-uri", tracking_uri, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert MlflowClient(tracking_uri).get_run(finished[0].run_id).data.metrics == before


def test_a_run_without_a_checkpoint_and_a_study_without_runs_are_refused(finished, tracking_uri: str, capsys,
                                                                         tmp_path: Path):
    tracker = Tracker(tracking_uri)
    bare = tracker.open_run("later", "no-checkpoint")
    bare.end()
    assert main(["evaluate", bare.run_id, "--tracking-uri", tracking_uri, "--no-progress"]) == 2
    assert "has no checkpoint" in capsys.readouterr().err
    (tmp_path / "experiments" / "empty.yaml").write_text("name: empty\n")
    assert main(["evaluate", "empty", "--top", "1", "--tracking-uri", tracking_uri, "--no-progress"]) == 2
    assert "no finished runs of 'empty'" in capsys.readouterr().err


def test_an_interrupted_evaluation_leaves_the_run_as_it_was(finished, tracking_uri: str, monkeypatch):
    from vaelab.evaluation import estimators

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    run_id = finished[0].run_id
    before = MlflowClient(tracking_uri).get_run(run_id).data
    monkeypatch.setattr(estimators, "importance_weighted_nll", interrupted)
    assert main(["evaluate", run_id, "--set", "eval.iw_samples=9", "--tracking-uri", tracking_uri,
                 "--no-progress"]) == 130
    after = MlflowClient(tracking_uri).get_run(run_id).data
    assert after.metrics == before.metrics and after.tags == before.tags


def test_the_dry_run_plan_names_the_evaluators_that_run():
    from vaelab.evaluation.plan import describe

    lines = describe(tiny_run(Path("unused")))
    assert [line.split()[0] for line in lines] == [*EVALUATORS, "figures"]
    assert "k=20 on up to 1000 test images" in lines[2]
