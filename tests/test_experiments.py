"""Every shipped spec validates, and a tiny version of it trains end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO
from vaelab.runner import run
from vaelab.spec import apply_overrides, load_spec
from vaelab.tracking import Tracker

SPECS = sorted((REPO / "experiments").glob("*.yaml"))


def test_the_shipped_specs_exist():
    names = {p.stem for p in SPECS}
    assert {"quickstart", "examples_baseline"} <= names


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_spec_validates_and_names_its_command(path: Path):
    spec = load_spec(path)
    assert spec.name == path.stem
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# ") and path.stem in first_line


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_tiny_version_trains(path: Path, fmnist_root: Path, tracking_uri: str):
    spec = load_spec(path)
    tiny = apply_overrides(spec, ["data.subset=300", "train.epochs=1", "eval.tsne_points=50",
                                  f"data.root={fmnist_root}", "train.device=cpu"])
    outcome = run(tiny.base, spec.name, Tracker(tracking_uri), show_progress=False)
    assert MlflowClient(tracking_uri).get_run(outcome.run_id).info.status == "FINISHED"
    assert 0 < outcome.metrics["test/elbo"] < 1e4
