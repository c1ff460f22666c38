"""Evaluators are records: a new one registered here (a toy) reaches the plan, the cost, the
stage, the report's headers and the CLI's help without any of them naming it; the
disentanglement scores' default sample sizes cost no more than training, and `--dry-run`
counts them. Tiny data, CPU, no MLflow."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.conftest import make_idx_folder, tiny_run
from vaelab.evaluation import disentanglement
from vaelab.evaluation.evaluators import EVALUATORS
from vaelab.evaluation.record import PASSES_PER_TRAINING_IMAGE, EvalContext, Evaluator, Facts, Metric
from vaelab.spec import with_values

CPU = torch.device("cpu")


def _toy_compute(ctx: EvalContext, settings: dict, progress) -> dict[str, float]:
    progress(settings["images"])
    return {"test/toy_score": 0.5 + settings["rounds"], "test/toy_side": 1.0}


TOY = Evaluator(
    name="toy",
    metrics=(Metric("test/toy_score", "toy score", "nats", "max", by_settings=True),
             Metric("test/toy_side", "toy side number", in_table=False)),
    settings=lambda facts: {"images": facts.test_images, "rounds": 3},
    passes=lambda settings: 7 * settings["images"],
    per_image=lambda settings: 7,
    compute=_toy_compute,
    plan=lambda run: "test/toy_score: seven passes over every test image",
    words=lambda settings: f"{settings['rounds']} rounds",
    suffix=lambda settings: f"_r{settings['rounds']}",
    suffix_shape="_r<rounds>",
    title="toy score",
    fixed_s=1.5,
)


@pytest.fixture
def toy(monkeypatch) -> Evaluator:
    monkeypatch.setitem(EVALUATORS, TOY.name, TOY)
    return TOY


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An untrained tiny model and its data: what the stage needs, nothing trained."""
    from vaelab.data import load_data
    from vaelab.training import init_model

    run = tiny_run(make_idx_folder(tmp_path_factory.mktemp("idx") / "m", n_train=120, n_test=40),
                   eval={"batch_size": 500, "iw_samples": 0, "probe": False, "tsne_points": 0})
    data = load_data(run.data, CPU)
    return run, data, init_model(run, data.shape, CPU)


def test_a_registered_evaluator_is_planned_without_editing_the_plan(toy):
    from vaelab.evaluation.plan import describe

    lines = describe(tiny_run(Path("unused")))
    assert [line.split()[0] for line in lines] == [*EVALUATORS, "figures"]
    assert "toy      test/toy_score: seven passes over every test image" in lines


def test_a_registered_evaluator_is_costed_as_its_passes_over_the_measured_rate(toy):
    from vaelab.cost import evaluation_cost

    run = tiny_run(Path("unused"), eval={"iw_samples": 0, "figures": False})
    cost = evaluation_cost(run, test_images=200)
    assert cost.seconds["toy"] == pytest.approx(7 * 200 / cost.images_per_s + 1.5)
    assert set(cost.seconds) == {"elbo", "latents", "probe", "toy"}  # iwae off, no factors: not counted
    assert cost.seconds["elbo"] == pytest.approx(200 / cost.images_per_s)


def test_a_registered_evaluator_runs_in_the_stage_and_is_marked_by_its_settings(toy, tiny):
    from vaelab.evaluation.stage import evaluate

    run, data, model = tiny
    context = EvalContext(model, data, run, epochs_run=1)
    own = evaluate(context, [toy], show_progress=False)
    assert own.metrics["test/toy_score"] == 3.5 and own.metrics["test/toy_side"] == 1.0
    assert own.tags["vaelab.eval.toy"] == '{"images": 40, "rounds": 3}'
    later = evaluate(context, [toy], show_progress=False, marked=True)
    # Only the metric its settings change is named by them.
    assert {"test/toy_score_r3", "test/toy_side", "time/eval/toy_r3_s"} <= set(later.metrics)
    assert "vaelab.eval.toy_r3" in later.tags
    again = evaluate(context, [toy], show_progress=False, marked=True, done_tags=later.tags)
    assert again.ran == [] and again.skipped == ["toy: already evaluated with these settings"]


def test_a_registered_evaluator_gets_its_report_header_and_settings_marks(toy, tmp_path: Path):
    from vaelab.report import StudyRuns, build_report, known_metrics

    assert known_metrics()["test/toy_score"] == ("toy score (nats)", "max")
    assert "test/toy_side" not in known_metrics()
    rows = [{"run_id": f"{i:032d}", "status": "FINISHED", "outcome": "finished", "start_time": 0, "end_time": 1000,
             "params.loss.beta": str(1 + i // 2), "params.train.seed": str(i % 2), "metrics.test/elbo": 100.0 + i,
             "metrics.test/toy_score": 1.0 + i, "metrics.test/toy_side": 9.0,
             "tags.vaelab.eval.toy": f'{{"images": 40, "rounds": {3 if i < 2 else 4}}}'} for i in range(4)]
    study = StudyRuns("toy", "1", pd.DataFrame(rows), None, ["loss.beta"])
    text = build_report(study, tmp_path).read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert "toy score (nats)" in table[0] and "toy side" not in table[0]
    assert "(3 rounds)" in table[2] and "(4 rounds)" in table[3]  # settings differ: written, not ranked
    assert "- toy score: runs used different settings" in text


def test_the_metrics_help_lists_every_evaluators_metrics(toy, capsys):
    from vaelab.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for evaluator in EVALUATORS.values():
        assert f"{evaluator.name} (" in text
        for metric in evaluator.metrics:
            assert metric.shown in text, metric.key
    assert "test/kl_dim/<d>" in text and "test/dis/mig" in text and "test/toy_score" in text


# ---- the disentanglement scores' affordable default ------------------------------------------------------
def _facts(run, train_images: int) -> Facts:
    return Facts(run, train_images, 100, run.train.epochs, True)


def test_auto_sample_sizes_cost_no_more_than_training():
    run = with_values(tiny_run(Path("unused"), dataset="dsprites"), {"train.epochs": 1})
    assert run.eval.dis_samples == "auto"
    reference = disentanglement.reference_passes()
    assert reference == 2_945_000  # disentanglement_lib's sizes: BetaVAE alone encodes 1.92 million images
    # disentanglement_quick for one epoch: 18,000 training images, 54,000 passes: 0.018 of the reference.
    settings = EVALUATORS["disentanglement"].settings(_facts(run, 18_000))
    assert settings["share_of_reference_sizes"] == 0.018 and settings["capped_by_training_passes"] == 54_000
    assert EVALUATORS["disentanglement"].passes(settings) <= PASSES_PER_TRAINING_IMAGE * 18_000
    assert settings["metrics"]["mig"]["num_train"] == 180
    # A long training affords the reference sizes; a tiny one still gets the floor.
    assert disentanglement.sample_share(with_values(run, {"train.epochs": 400}), 18_000) == 1.0
    assert disentanglement.sample_share(run, 100) == disentanglement.MIN_SHARE
    # Asked for, a share is used as it is, and recorded as before (no cap in its settings).
    explicit = EVALUATORS["disentanglement"].settings(_facts(with_values(run, {"eval.dis_samples": 1.0}), 18_000))
    assert explicit["share_of_reference_sizes"] == 1.0 and "capped_by_training_passes" not in explicit
    assert explicit["metrics"]["beta_vae"]["num_train"] == 10_000
    assert EVALUATORS["disentanglement"].suffix(explicit) == "_s1"
    assert EVALUATORS["disentanglement"].suffix(settings) == "_s0.018"
    # Neither the plan nor the cost counts it where it cannot run.
    assert EVALUATORS["disentanglement"].turned_off(with_values(run, {"model.conditional": True}))
    assert EVALUATORS["disentanglement"].turned_off(tiny_run(Path("unused"))).startswith("the data has no")


def test_a_later_evaluation_uses_the_reference_sizes_and_the_study_sets_them():
    from vaelab.evaluation.later import with_eval_overrides
    from vaelab.spec import load_spec

    run = tiny_run(Path("unused"), dataset="dsprites")
    assert with_eval_overrides(run, []).eval.dis_samples == 1.0
    assert with_eval_overrides(run, ["eval.dis_samples=auto"]).eval.dis_samples == "auto"
    study = load_spec(Path(__file__).resolve().parents[1] / "experiments" / "disentanglement_study.yaml")
    assert study.base.eval.dis_samples == 1.0


def test_dis_samples_takes_auto_or_a_share():
    from vaelab.spec import SpecError, apply_overrides, parse_spec

    spec = parse_spec({"name": "x"})
    assert apply_overrides(spec, ["eval.dis_samples=0.25"]).base.eval.dis_samples == 0.25
    with pytest.raises(SpecError, match=r"eval.dis_samples: expected auto or float > 0 and <= 1"):
        apply_overrides(spec, ["eval.dis_samples=2"])


def test_the_sweep_dry_run_of_a_dsprites_spec_prints_a_disentanglement_cost(tmp_path: Path, capsys):
    from vaelab.cli import main

    spec = tmp_path / "dis.yaml"
    spec.write_text(
        "name: dis\nbase:\n  data: {dataset: dsprites, subset: 2000}\n  model: {z_dim: 4, hidden: [32]}\n"
        "  train: {epochs: 1, device: cpu}\n"
        "  eval: {iw_samples: 0, probe: false, figures: false, dci_importance: random_forest}\n"
        "search:\n  kind: grid\n  params: {loss.beta: [1, 4]}\n  seeds: [0]\n")
    assert main(["sweep", str(spec), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "disentanglement  test/dis/*" in out and "training's 5,400 image passes" in out
    # Its cost is counted: passes over the rate it measured itself (rendering, encoding, the classifiers).
    [cost] = [line for line in out.splitlines() if "One run's evaluation" in line]
    assert "elbo" in cost and "latents" in cost and "disentanglement" in cost

