"""Reports built from a tiny real sweep, checked against the MLflow store."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.test_sweep import make_sweep, write_spec
from vaelab.report import ReportError, build_report, select_runs, write_study_report
from vaelab.report.optuna_section import optuna_report_section
from vaelab.spec import load_spec
from vaelab.tracking import Tracker

GRID = {"kind": "grid", "params": {"loss.beta": [0.5, 4.0]}, "seeds": [0, 1, 2]}
TINY_FIGURES = {"figures": True, "tsne_points": 30, "iw_samples": 10, "probe": True}


def parse_markdown_table(text: str) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return header, rows


def number(cell: str) -> tuple[float, float]:
    mean, _, std = cell.removesuffix(" †").strip("*").partition(" ± ")
    return float(mean), float(std) if std else float("nan")


@pytest.fixture
def grid_study(tmp_path: Path, mnist_root: Path):
    path = write_spec(tmp_path, mnist_root, GRID, eval=TINY_FIGURES)
    sweep = make_sweep(tmp_path, path)
    parent = sweep.prepare()
    sweep.work(parent)
    sweep.finish(parent)
    return path, sweep


def test_report_numbers_match_the_store(grid_study, tmp_path: Path):
    path, sweep = grid_study
    tracker = sweep.tracker
    report = write_study_report(load_spec(path), tracker, tmp_path / "out")
    text = report.read_text()
    assert "6 finished, 0 pruned, 0 failed, 0 running" in text
    header, rows = parse_markdown_table(text.split("## Results")[1])
    assert header[:4] == ["loss.beta", "test −ELBO (nats)", "test recon (nats)", "test KL (nats)"]
    assert {"test MSE (per pixel)", "active units", "epochs", "n", "runs"} <= set(header)
    assert [row[0] for row in rows] == ["0.5", "4.0"]

    client = MlflowClient(tracker.uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep_demo").experiment_id])
    for row in rows:
        values = [r.data.metrics for r in runs
                  if r.data.params.get("loss.beta") == row[0] and "mlflow.parentRunId" in r.data.tags]
        assert len(values) == 3 and row[header.index("n")] == "3"
        for column, metric in (("test −ELBO (nats)", "test/elbo"), ("test KL (nats)", "test/kl")):
            mean, std = number(row[header.index(column)])
            expected = np.array([v[metric] for v in values])
            assert mean == pytest.approx(expected.mean(), abs=0.006)
            assert std == pytest.approx(expected.std(ddof=1), abs=0.006)
        run_ids = re.findall(r"runs/([0-9a-f]{32})\?workflowType=machine_learning\)", row[header.index("runs")])
        assert len(run_ids) == 3

    # A winner is bold only if Welch's t-test over the seeds' own numbers says it beats the other row.
    from scipy.stats import ttest_ind

    elbos = [[r.data.metrics["test/elbo"] for r in runs if r.data.params.get("loss.beta") == row[0]
              and "mlflow.parentRunId" in r.data.tags] for row in rows]
    significant = ttest_ind(*elbos, equal_var=False).pvalue < 0.05
    cells = [row[header.index("test −ELBO (nats)")] for row in rows]
    assert sum(c.startswith("**") for c in cells) == (1 if significant else 0)
    assert sum(c.endswith(" †") for c in cells) == (0 if significant else 2)
    assert "Welch's t-test" in text
    csv = (tmp_path / "out" / "table.csv").read_text().splitlines()
    assert csv[0].startswith("loss.beta,n,test/elbo mean,test/elbo std") and len(csv) == 3

    figures = sorted(re.findall(r"\(figures/([^)]+\.png)\)", text))
    assert {"by_loss_beta.png", "rate_distortion.png", "best_reconstructions.png", "best_samples.png"} <= set(figures)
    for name in figures:
        with Image.open(tmp_path / "out" / "figures" / name) as image:
            image.verify()


def test_the_parent_run_carries_the_report_and_the_winner(grid_study, tmp_path: Path):
    path, sweep = grid_study
    write_study_report(load_spec(path), sweep.tracker, tmp_path / "out")
    client = MlflowClient(sweep.tracker.uri)
    experiment = client.get_experiment_by_name("sweep_demo")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if "vaelab.sweep" in r.data.tags)
    best = client.get_run(parent.data.tags["vaelab.best_run"])
    # The winner by the sweep's own metric (val/elbo, lowest), its values and test numbers on the parent.
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert best.info.run_id == min(children, key=lambda r: r.data.metrics["best/val/elbo"]).info.run_id
    assert parent.data.metrics["best_run/test/elbo"] == pytest.approx(best.data.metrics["test/elbo"])
    assert parent.data.tags["vaelab.best_config"] == (f"loss.beta={best.data.params['loss.beta']}, "
                                                      f"seed={best.data.params['train.seed']}")
    assert "Best run:" in parent.data.tags["mlflow.note.content"]
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/table.csv", "report/figures"} <= names
    figures = {a.path for a in client.list_artifacts(parent.info.run_id, "report/figures")}
    assert "report/figures/rate_distortion.png" in figures


def test_the_html_report_is_one_file_with_its_figures_inside(grid_study, tmp_path: Path):
    from vaelab.report.html import write_html

    path, sweep = grid_study
    report = write_study_report(load_spec(path), sweep.tracker, tmp_path / "out")
    page = write_html(report).read_text()
    assert page.count("<table>") == 1 and re.search(r"<th[^>]*>loss\.beta</th>", page)
    figures = re.findall(r"\(figures/([^)]+\.png)\)", report.read_text())
    assert page.count('src="data:image/png;base64,') == len(figures) >= 3
    assert 'src="figures/' not in page  # nothing left to fetch beside the file


def test_partial_study_says_what_is_missing(tmp_path: Path, mnist_root: Path):
    path = write_spec(tmp_path, mnist_root, GRID)
    sweep = make_sweep(tmp_path, path)
    parent = sweep.prepare()
    sweep.work(parent, max_trials=2)
    text = write_study_report(load_spec(path), sweep.tracker, tmp_path / "out").read_text()
    assert "Partial study:** 2 of 6 runs are done" in text
    _, rows = parse_markdown_table(text.split("## Results")[1])
    assert len(rows) == 1  # both finished runs are beta=0.5 (seeds 0, 1)


def test_mixed_likelihoods_are_flagged(tmp_path: Path, mnist_root: Path):
    search = {"kind": "grid", "params": {"loss.likelihood": ["bernoulli", "gaussian"]}}
    path = write_spec(tmp_path, mnist_root, search)
    sweep = make_sweep(tmp_path, path)
    sweep.work(sweep.prepare())
    text = write_study_report(load_spec(path), sweep.tracker, tmp_path / "out").read_text()
    assert "Mixed likelihoods" in text and "test MSE (per pixel)" in text


def test_unknown_or_empty_study_is_one_line(tmp_path: Path, mnist_root: Path):
    path = write_spec(tmp_path, mnist_root, GRID)
    tracker = Tracker(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    with pytest.raises(ReportError, match="no runs of 'sweep_demo'") as err:
        write_study_report(load_spec(path), tracker, tmp_path / "out")
    assert "\n" not in str(err.value)
    sweep = make_sweep(tmp_path, path)
    sweep.prepare()  # a parent run, no trial yet
    with pytest.raises(ReportError, match="no finished runs"):
        write_study_report(load_spec(path), sweep.tracker, tmp_path / "out")


def test_optuna_study_gets_best_trials_and_plots(tmp_path: Path, mnist_root: Path):
    search = {"kind": "optuna", "n_trials": 4, "sampler": "random", "pruner": "none",
              "params": {"loss.beta": {"low": 0.5, "high": 4.0, "log": True},
                         "train.lr": {"low": 1e-4, "high": 1e-2, "log": True}}}
    path = write_spec(tmp_path, mnist_root, search)
    sweep = make_sweep(tmp_path, path)
    sweep.work(sweep.prepare())
    spec = load_spec(path)
    out = tmp_path / "out"
    report = write_study_report(spec, sweep.tracker, out, optuna_figures=lambda folder: optuna_report_section(
        spec, None, folder, studies_root=tmp_path / "studies"))
    text = report.read_text()
    assert "Best trials by val/loss (minimize)" in text
    for name in ("optuna_history.png", "optuna_importances.png"):
        assert f"figures/{name}" in text
        with Image.open(out / "figures" / name) as image:
            image.verify()
    assert "by_loss_beta.png" not in text  # per-parameter curves are for grids


def test_pareto_front_keeps_only_undominated_runs():
    from vaelab.report.figures import pareto_front

    rate = np.array([1.0, 2.0, 3.0, 2.5, 4.0])
    distortion = np.array([10.0, 8.0, 9.0, 7.0, 6.5])  # (3, 9) is beaten by (2, 8)
    assert pareto_front(rate, distortion).tolist() == [0, 1, 3, 4]


def _frame(tags: list[str]) -> pd.DataFrame:
    rows = []
    for i, tag in enumerate(tags):
        rows.append({"run_id": f"{i:032d}", "status": "FINISHED", "run_name": f"r{i}", "start_time": 0,
                     "end_time": 1000, "artifact_uri": "", "params.loss.beta": str(1 + i // 2),
                     "params.train.seed": str(i % 2), "metrics.test/elbo": 250.0 - i,
                     "metrics.test/nll_iw": 240.0 - i, "metrics.test/nll_iw_se": 1.5,
                     "tags.vaelab.eval.iwae": tag})
    return pd.DataFrame(rows)


def test_the_report_marks_and_does_not_rank_numbers_made_with_different_settings(tmp_path: Path):
    small = json.dumps({"k": 100, "images": 1000, "of": 10000})
    full = json.dumps({"k": 100, "images": 10000, "of": 10000})
    study = select_runs("demo", "1", _frame([small, small, full, full]))
    text = build_report(study, tmp_path).read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert "(k=100, 1000 of 10000 images)" in table[2] and "(k=100, 10000 of 10000 images)" in table[3]
    nll_column = [row.split("|")[3] for row in table[2:]]
    assert "NLL, IWAE" in table[0].split("|")[3]
    assert not any("**" in cell for cell in nll_column)  # not ranked
    assert "test NLL s.e. over images (nats)" in table[0]

    same = select_runs("demo", "1", _frame([small] * 4))
    text = build_report(same, tmp_path).read_text()
    assert "test NLL (IWAE, Burda et al. 2016): k=100, 1000 of 10000 images" in text
    assert "(k=100" not in "\n".join(line for line in text.splitlines() if line.startswith("|"))


def test_a_best_within_seed_noise_of_the_runner_up_is_not_bold():
    import pandas as pd

    from vaelab.report import rank_against_noise

    def table(rows):
        return pd.DataFrame([{"test/elbo mean": m, "test/elbo std": s, "n": n} for m, s, n in rows])

    # 312.81 ± 5.45 against 314.13 ± 4.96 over 3 seeds: Welch's p is about 0.78, no winner.
    best, tied = rank_against_noise(table([(314.13, 4.96, 3), (312.81, 5.45, 3), (340.0, 1.0, 3)]), "test/elbo", "min")
    assert best == 1 and tied == [0]
    # Far apart with small spread: a winner, nothing tied.
    assert rank_against_noise(table([(300.0, 1.0, 3), (320.0, 1.0, 3)]), "test/elbo", "min") == (0, [])
    # One run per row (an Optuna search): nothing to judge spread by, nothing ranked.
    assert rank_against_noise(table([(300.0, float("nan"), 1), (320.0, float("nan"), 1)]), "test/elbo", "min") \
        == (None, [])
    # The same check as scipy's Welch test on the runs themselves.
    from scipy.stats import ttest_ind

    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.5, 3.5, 4.5, 5.5])
    p = ttest_ind(a, b, equal_var=False).pvalue
    rows = table([(a.mean(), a.std(ddof=1), 4), (b.mean(), b.std(ddof=1), 4)])
    assert (rank_against_noise(rows, "test/elbo", "min")[1] == [1]) == (p >= 0.05)


def test_a_swept_key_no_finished_run_uses_yet_is_a_dash(tmp_path: Path):
    import pandas as pd

    from vaelab.report import StudyRuns, build_report

    # A union sweep part-way: only beta_vae runs are done, so no run has logged loss.factor_gamma.
    rows = [{"run_id": f"{i:032d}", "status": "FINISHED", "outcome": "finished", "start_time": 0, "end_time": 1000,
             "params.loss.objective": "beta_vae", "params.loss.beta": str(beta), "params.train.seed": str(seed),
             "metrics.test/elbo": 100.0 + beta + seed, "metrics.test/recon": 90.0, "metrics.test/kl": 10.0}
            for i, (beta, seed) in enumerate([(1, 0), (1, 1), (4, 0), (4, 1)])]
    study = StudyRuns("part", "1", pd.DataFrame(rows), None, ["loss.objective", "loss.beta", "loss.factor_gamma"])
    header, table = parse_markdown_table(build_report(study, tmp_path).read_text().split("## Results")[1])
    assert [row[header.index("loss.factor_gamma")] for row in table] == ["—", "—"]
