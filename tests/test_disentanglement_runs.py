"""A run on dSprites (rendered: nothing downloaded) is scored for disentanglement, with
the estimator settings beside the metrics; data without factors skips it with a reason."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tests.conftest import tiny_run
from vaelab.evaluation.disentanglement import draw_seed
from vaelab.runlog import MemoryRuns
from vaelab.runner import run
from vaelab.spec import with_values


def test_a_dsprites_run_logs_every_metric_family_with_its_settings(tmp_path: Path):
    runspec = with_values(tiny_run(tmp_path / "none", dataset="dsprites"), {
        "data.subset": 600, "data.test_fraction": 0.001, "data.cache_dir": str(tmp_path / "cache"),
        "train.epochs": 1, "eval.iw_samples": 0, "eval.figures": False, "eval.tsne_points": 0,
        "eval.dis_samples": 0.01})
    logs = MemoryRuns(tmp_path / "runs")
    outcome = run(runspec, "dsprites", logs, show_progress=False)
    record = logs.runs[outcome.run_id]
    metrics = record.latest()
    for name in ("beta_vae", "factor_vae", "mig", "sap", "dci_disentanglement", "dci_completeness",
                 "dci_informativeness", "modularity", "explicitness"):
        value = metrics[f"test/dis/{name}"]
        assert math.isfinite(value) and 0.0 <= value <= 1.0, (name, value)
    settings = json.loads(record.tags["vaelab.eval.disentanglement"])
    assert settings["metrics"]["mig"]["num_train"] == 100 and settings["metrics"]["mig"]["num_bins"] == 20
    # Each score's standard error beside it, how it was estimated and the run's own draws in the settings.
    for name in ("mig", "sap", "dci_disentanglement", "dci_completeness", "dci_informativeness", "modularity",
                 "explicitness"):
        assert math.isfinite(metrics[f"test/dis/{name}_se"]) and metrics[f"test/dis/{name}_se"] >= 0.0, name
    assert metrics["test/dis/mig_se"] > 0.0 and "bootstrap" in settings["metrics"]["mig"]["se_method"]
    assert settings["seed"] == draw_seed(runspec)
    assert "Chen et al. 2018" in settings["metrics"]["mig"]["paper"]
    assert settings["metrics"]["dci"]["importance"] == "gbt"  # the reference's estimator unless asked
    # The split sizes: a random 600 of the grid to train on (540 + 60 for validation), 737 to test.
    inputs = {d["context"]: d["profile"] for d in record.datasets}
    assert [inputs[c]["images"] for c in ("train", "validation", "test")] == [540, 60, 737]
    assert inputs["train"]["classes"] == ["square", "ellipse", "heart"]
    assert min(inputs["train"]["images_per_class"].values()) > 100  # a random sample, not the grid's first rows


def test_the_report_draws_each_score_against_the_strength_per_objective(tmp_path: Path):
    import pandas as pd

    from vaelab.report.figures import DIS_PANELS, swept_param_figures

    rows = []
    for objective in ("beta_vae", "beta_tcvae"):
        for beta in (1, 4, 8):
            for seed in (0, 1):
                scores = {f"metrics.{m}": 0.1 * beta + 0.01 * seed for m, _ in DIS_PANELS}
                rows.append({"params.loss.objective": objective, "params.loss.beta": str(beta), **scores})
    paths = swept_param_figures(pd.DataFrame(rows), ["loss.objective", "loss.beta"], tmp_path, DIS_PANELS,
                                "disentanglement_by")
    assert [p.name for p in paths] == ["disentanglement_by_loss_objective.png", "disentanglement_by_loss_beta.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)
    # Runs without the scores (data without factors) draw nothing.
    assert swept_param_figures(pd.DataFrame([{"params.loss.beta": "1"}]), ["loss.beta"], tmp_path, DIS_PANELS,
                               "disentanglement_by") == []


def test_the_report_draws_each_objective_against_its_own_strength(tmp_path: Path):
    import pandas as pd

    from vaelab.report import StudyRuns, build_report
    from vaelab.report.figures import DIS_PANELS, by_objective

    rows = []
    strengths = {"beta_vae": ("loss.beta", (1, 4)), "factorvae": ("loss.factor_gamma", (10, 40)),
                 "dip_vae_ii": ("loss.dip_lambda_od", (1, 10))}
    for objective, (key, values) in strengths.items():
        for value in values:
            for seed in (0, 1):
                row = {"params.loss.objective": objective, "params.loss.beta": "1", "params.loss.factor_gamma": "10",
                       "params.loss.dip_lambda_od": "10", "params.train.seed": str(seed)}
                row[f"params.{key}"] = str(value)
                row.update({f"metrics.{m}": 0.01 * value + 0.001 * seed for m, _ in DIS_PANELS})
                row.update({"metrics.test/elbo": 100.0 + value, "metrics.test/recon": 90.0, "metrics.test/kl": 10.0})
                rows.append({**row, "run_id": f"{objective}{value}{seed}", "status": "FINISHED",
                             "start_time": 0, "end_time": 1000})
    frame = pd.DataFrame(rows)
    [path] = by_objective(frame, tmp_path)
    assert path.name == "disentanglement_by_objective.png" and path.stat().st_size > 20_000
    frame["outcome"] = "finished"
    study = StudyRuns("dis", "1", frame, None, ["loss.objective", "loss.beta", "loss.factor_gamma",
                                                "loss.dip_lambda_od"])
    text = build_report(study, tmp_path / "report").read_text()
    assert "](figures/disentanglement_by_objective.png)" in text and "](figures/by_objective.png)" in text
    assert "by_loss_factor_gamma" not in text  # no per-key figures mixing objectives
    results, scores = text.split("## Disentanglement")
    assert "MIG" in scores and "MIG" not in results.split("## Results")[1]
    # One row per configuration, mean ± std over the two seeds: factorvae at gamma 40 has MIG 0.40 ± 0.00.
    factor_row = next(line for line in scores.splitlines() if "factorvae" in line and "| 40 " in line)
    assert "0.40 ± 0.00" in factor_row
