"""What a researcher sees in a browser, seen by a real one: headless Chromium over `vaelab ui` and
`vaelab dashboard` on a temporary store holding a tiny sweep. The runs page shows the sweep's parent
run (children under it) in the model-training view, a child's page shows its metric charts and its
figures, and the dashboard lists the study's trials. Screenshots of what the browser saw go to
$VAELAB_TEST_ARTIFACTS (default test-artifacts/ in the checkout); the README's pictures come from them."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, make_idx_folder
from tests.test_sweep import make_sweep, write_spec
from tests.test_ui import free_port, start_ui, wait_until_up

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (Debian package chromium)")
SHOTS = Path(os.environ.get("VAELAB_TEST_ARTIFACTS", REPO / "test-artifacts")) / "screenshots"
ML_VIEW = "?workflowType=machine_learning"


def browse(url: str, screenshot: str | None = None, wait_ms: int = 15_000) -> str:
    """The page's text once its scripts have run (Chromium's virtual time lets the app fetch and render)."""
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,900",
            f"--virtual-time-budget={wait_ms}", f"--user-data-dir={SHOTS.parent / '.chromium'}"]
    if screenshot:
        SHOTS.mkdir(parents=True, exist_ok=True)
        subprocess.run([*base, f"--screenshot={SHOTS / screenshot}", url], capture_output=True, timeout=180)
    done = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    page = re.sub(r"<script.*?</script>|<style.*?</style>", "", done.stdout, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))), done.stdout


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """A two-point grid sweep with two seeds each, trained, with figures: what the browser tests look at."""
    tmp_path = tmp_path_factory.mktemp("browser")
    mnist_root = make_idx_folder(tmp_path / "mnist-files")
    search = {"kind": "grid", "params": {"loss.beta": [0.5, 2.0]}, "seeds": [0, 1]}
    path = write_spec(tmp_path, mnist_root, search, name="browser_demo",
                      eval={"figures": True, "iw_samples": 0, "probe": False, "tsne_points": 0})
    body = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**body, "description": "Two betas, seen in a browser."}))
    sweep = make_sweep(tmp_path, path)
    parent = sweep.prepare()
    sweep.work(parent)
    sweep.finish(parent)
    return tmp_path, parent


@pytest.fixture(scope="module")
def ui(tiny_study):
    tmp_path, parent = tiny_study
    port = free_port()
    server = start_ui(tmp_path, port)
    wait_until_up(server, port)
    yield f"http://127.0.0.1:{port}", tmp_path, parent
    server.terminate()
    server.wait(timeout=60)


def test_the_runs_page_shows_the_sweep_in_the_model_training_view(ui):
    base, tmp_path, parent = ui
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("browser_demo")
    text, _ = browse(f"{base}/#/experiments/{experiment.experiment_id}{ML_VIEW}", "runs_page.png")
    assert "sweep-browser_demo" in text  # the parent run, its four children folded under it
    assert "Model training" in text and "Evaluations" not in text
    assert "Two betas, seen in a browser." in text  # the spec's description, as the experiment's
    assert "5 matching runs" in text  # the parent and its four children


def test_the_sweeps_grouped_view_shows_each_configurations_seeds_as_one_group(ui):
    base, tmp_path, parent = ui
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    note = client.get_run(parent).data.tags["mlflow.note.content"]
    # The parent run's note links the view (a local store's link points at `make ui`'s port).
    link = re.search(r"http://127\.0\.0\.1:5000(/#/experiments/\S+viewStateShareKey=by-configuration\S*)", note)
    assert link, note
    text, _ = browse(f"{base}{link.group(1)}", "runs_grouped_by_configuration.png")
    assert "Group by: vaelab.config" in text
    # one group per configuration, each holding its two seeds
    for beta in ("0.5", "2.0"):
        assert re.search(rf"Group: loss\.beta={beta} 2\b", text), text[:2000]
        assert f"beta={beta} seed=0" in text and f"beta={beta} seed=1" in text
    # the charts plot the groups (their mean, min-max band), not the four runs one by one: each chart's
    # legend names the two groups, and no run by its own name
    assert "Additional runs" in text, text
    legend = text.split("Additional runs", 1)[1]
    assert "loss.beta=0.5" in legend and "loss.beta=2.0" in legend and "seed=0" not in legend


def test_a_child_page_shows_its_metric_charts_and_figures(ui):
    base, tmp_path, parent = ui
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("browser_demo")
    child = next(r for r in client.search_runs([experiment.experiment_id])
                 if r.data.tags.get("mlflow.parentRunId") == parent)
    page = f"{base}/#/experiments/{experiment.experiment_id}/runs/{child.info.run_id}"
    overview, _ = browse(f"{page}{ML_VIEW}", "child_overview.png")
    assert child.info.run_name in overview and "Evaluations" not in overview
    # Only the params the run used: loss.sigma (a Bernoulli run's) is named in the not-used tag, not a param row.
    assert re.search(r"loss\.beta (0\.5|2\.0)\b", overview) and not re.search(r"loss\.sigma 0\.1\b", overview)
    charts, _ = browse(f"{page}/model-metrics{ML_VIEW}", "child_metrics.png")
    for section in ("train (", "val (", "test ("):
        assert section in charts
    figure, dom = browse(f"{page}/artifacts/figures/samples.png{ML_VIEW}", "child_samples.png")
    assert "reconstructions.png" in figure and "traversals.png" in figure
    assert re.search(r'<img[^>]+alt="figures/samples.png"', dom)  # the figure itself is shown


def test_the_compare_view_lines_up_the_childrens_figures(ui):
    import json
    from urllib.parse import quote

    base, tmp_path, parent = ui
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("browser_demo")
    ids = [r.info.run_id for r in client.search_runs([experiment.experiment_id])
           if r.data.tags.get("mlflow.parentRunId") == parent]
    query = f"runs={quote(json.dumps(ids))}&experiments={quote(json.dumps([experiment.experiment_id]))}"
    text, dom = browse(f"{base}/#/compare-runs?{query}", "compare_runs.png")
    assert "No common artifacts" not in text
    assert "samples.png" in text and "reconstructions.png" in text


def test_the_dashboard_lists_the_studys_trials(tiny_study):
    tmp_path, _ = tiny_study
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server = subprocess.Popen([sys.executable, "-m", "vaelab", "dashboard", "browser_demo", "--port", str(port)],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_up(server, port, path="/api/meta")
        text, _ = browse(f"http://127.0.0.1:{port}/dashboard/studies/0", "dashboard_study.png")
        assert "browser_demo" in text
        trials, _ = browse(f"http://127.0.0.1:{port}/dashboard/studies/0/trials", "dashboard_trials.png")
        assert "Trial 0" in trials and "Trial 1" in trials and "COMPLETE" in trials.upper()
        # each trial's key figures, as Optuna artifacts beside the study
        assert "samples.png" in trials and "reconstructions.png" in trials, trials[:3000]
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_the_dashboard_refuses_a_study_that_does_not_exist(tmp_path: Path):
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "nothing_yet.yaml").write_text(yaml.safe_dump({
        "name": "nothing_yet", "search": {"kind": "grid", "params": {"loss.beta": [1, 2]}}}))
    done = subprocess.run([sys.executable, "-m", "vaelab", "dashboard", "nothing_yet", "--port", str(free_port())],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "no study 'nothing_yet' yet" in done.stderr
    assert not (tmp_path / "studies").exists()  # nothing created
