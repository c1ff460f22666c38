"""Every shipped spec validates, and a tiny version of it trains end to end. Only the specs the
project ships are checked: a researcher's own spec in experiments/ (where `make train SPEC=` and
`make sweep EXP=` look) is theirs, and never breaks `make test`."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, make_pictures, save_hf_images
from vaelab.registry import image_shape
from vaelab.runlog import MemoryRuns
from vaelab.runner import run
from vaelab.search import expand_grid
from vaelab.spec import apply_overrides, load_spec
from vaelab.sweeps.coordinator import Sweep
from vaelab.tracking import Tracker

# The specs vaelab ships, by name: what git tracks in experiments/ (this list stands in outside a git checkout,
# and test_the_shipped_specs_are_the_tracked_ones keeps the two the same).
SHIPPED = ("arch_loss_grid", "beta_study", "binarized_nll", "disentanglement_quick", "disentanglement_study",
           "examples_baseline", "fmnist_nll", "huggingface_example", "landscapes_example", "optuna_search",
           "quickstart", "zdim_study")


def tracked_specs(folder: Path) -> list[Path] | None:
    """The YAML specs git tracks in `folder`, or None outside a git checkout."""
    try:
        listed = subprocess.run(["git", "ls-files", "--", "*.yaml"], cwd=folder, capture_output=True, text=True,
                                timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if listed.returncode != 0:
        return None
    return sorted(folder / name for name in listed.stdout.split() if "/" not in name)


def shipped_specs(folder: Path) -> list[Path]:
    """The shipped specs in `folder`; any other file there is a user's and none of these tests' business."""
    tracked = tracked_specs(folder)
    return tracked if tracked is not None else [folder / f"{name}.yaml" for name in SHIPPED]


SPECS = shipped_specs(REPO / "experiments")
# Per dataset, what makes a shipped spec tiny beyond epochs and subsets (dSprites: a small test split, and no
# disentanglement scores: tests/test_disentanglement_runs.py scores a dSprites run).
TINY_DATA = {"dsprites": ["data.test_fraction=0.001", "eval.disentanglement=false"]}


def test_the_shipped_specs_exist():
    missing = [p.name for p in SPECS if not p.is_file()]
    assert not missing, f"listed in SHIPPED but not in experiments/: {missing}"


def test_the_shipped_specs_are_the_tracked_ones():
    tracked = tracked_specs(REPO / "experiments")
    if tracked is None:
        pytest.skip("not a git checkout: SHIPPED stands in for what git tracks")
    assert sorted(p.stem for p in tracked) == sorted(SHIPPED)


def test_a_users_own_spec_in_experiments_is_not_checked(tmp_path: Path):
    """A spec of one's own without the header comment (or any other rule here) sits beside the shipped ones,
    untracked, and is not among the specs these tests check."""
    folder = tmp_path / "experiments"
    folder.mkdir()
    (folder / "shipped.yaml").write_text("# vaelab train shipped\nname: shipped\n")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "add", "experiments/shipped.yaml"], cwd=tmp_path, check=True)
    (folder / "my_study.yaml").write_text("name: my_study\nbase: {train: {epochs: 2}}\n")
    assert shipped_specs(folder) == [folder / "shipped.yaml"]


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_spec_validates_and_names_its_command(path: Path):
    spec = load_spec(path)
    assert spec.name == path.stem
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# ") and path.stem in first_line


SWEEPS = [p for p in SPECS if load_spec(p).search is not None]


def test_the_shipped_studies_exist():
    assert {"beta_study", "zdim_study", "arch_loss_grid", "optuna_search"} <= {p.stem for p in SWEEPS}
    beta = load_spec(REPO / "experiments" / "beta_study.yaml")
    assert len(expand_grid(beta.search, beta.base)) == 15


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_tiny_version_of_each_sweep_runs_two_trials(path: Path, fmnist_root: Path, tmp_path: Path):
    spec = apply_overrides(load_spec(path), ["data.subset=300", "train.epochs=1", "eval.figures=false",
                                             "eval.iw_samples=0", f"data.root={fmnist_root}", "train.device=cpu",
                                             *TINY_DATA.get(load_spec(path).base.data.dataset, []),
                                             f"data.cache_dir={tmp_path / 'cache'}", "eval.disentanglement=false"])
    tracker = Tracker(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    sweep = Sweep(spec, tracker=tracker, studies_root=tmp_path / "studies")
    assert sweep.work(sweep.prepare(), max_trials=2) == 2
    assert sweep.counts().complete == 2


def data_overrides(spec, tmp_path: Path, request) -> list[str]:
    """Real Fashion-MNIST for the MNIST family; generated pictures for image folders."""
    if spec.base.data.dataset == "image_folder":
        make_pictures(tmp_path / "pictures", 40)
        return [f"data.root={tmp_path / 'pictures'}", f"data.cache_dir={tmp_path / 'cache'}"]
    if spec.base.data.dataset == "dsprites":  # rendered: no file needed
        return [*TINY_DATA["dsprites"], "data.subset=300", f"data.cache_dir={tmp_path / 'cache'}"]
    if spec.base.data.dataset == "huggingface":
        request.getfixturevalue("hf_offline")
        saved = save_hf_images(tmp_path / "hf_images")
        return [f"data.hf.path={saved}", f"data.cache_dir={tmp_path / 'cache'}"]
    return [f"data.root={request.getfixturevalue('fmnist_root')}", "data.subset=300"]


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_tiny_version_trains(path: Path, tmp_path: Path, request):
    spec = load_spec(path)
    tiny = apply_overrides(spec, ["train.epochs=1", "eval.tsne_points=20", "eval.iw_samples=5", "train.device=cpu",
                                  "eval.dis_samples=0.01", *data_overrides(spec, tmp_path, request)])
    logs = MemoryRuns(tmp_path / "runs")  # the spec is the subject here, not the tracking store
    outcome = run(tiny.base, spec.name, logs, show_progress=False)
    assert logs.runs[outcome.run_id].status == "FINISHED"
    pixels = math.prod(image_shape(tiny.base.data))
    assert math.isfinite(outcome.metrics["test/elbo"]) and abs(outcome.metrics["test/elbo"]) / pixels < 20
