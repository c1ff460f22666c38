"""The factor x latent mutual-information heatmap and factor-labelled traversals: the labels follow the
information (a latent copying a factor is named for it), and a dSprites run writes both pictures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tests.conftest import tiny_run
from vaelab.data.dsprites import DSprites
from vaelab.disentanglement.figures import factor_latent_mi, write_factor_figures
from vaelab.runlog import MemoryRuns
from vaelab.runner import run
from vaelab.spec import with_values
from vaelab.training import init_model

SIZES = (3, 6, 8, 8, 8)


class Permuted(DSprites):
    """Factor data whose 'images' are the factors themselves, for an encoder that reads them out."""

    def images(self, factors):
        return np.asarray(factors, dtype=np.float64)


def test_each_factor_is_named_for_the_latent_that_copies_it():
    data = Permuted(factor_sizes=SIZES)
    order = [3, 0, 4, 1, 2]  # latent d holds factor order[d]; plus one latent of noise

    def encode(factors):
        rng = np.random.default_rng(len(factors))
        return np.concatenate([factors[:, order] * 1.7 - 2.0, rng.normal(size=(len(factors), 1))], axis=1)

    mi = factor_latent_mi(data, encode, 4000, seed=0)
    assert mi.normalised.shape == (6, 5)
    assert mi.best_latent() == [order.index(f) for f in range(5)]
    for f, d in enumerate(mi.best_latent()):
        assert mi.normalised[d, f] > 0.95  # a copy carries (nearly) all of the factor's entropy...
        assert np.delete(mi.normalised[:, f], d).max() < 0.05  # ...and no other latent any of it
    assert mi.normalised[5].max() < 0.05  # the noise latent explains nothing


def test_the_figures_are_drawn_for_a_model(tmp_path: Path):
    run_spec = with_values(tiny_run(tmp_path, dataset="dsprites"), {"model.arch": "mlp"})
    model = init_model(run_spec, (1, 64, 64), torch.device("cpu"))
    paths = write_factor_figures(model, model.likelihood, DSprites(factor_sizes=SIZES), tmp_path, seed=0,
                                 samples=500)
    assert [p.name for p in paths] == ["factor_mi.png", "factor_traversals.png"]
    assert all(p.stat().st_size > 5_000 for p in paths)


def test_a_dsprites_run_logs_the_factor_figures(tmp_path: Path):
    runspec = with_values(tiny_run(tmp_path / "none", dataset="dsprites"), {
        "data.subset": 400, "data.test_fraction": 0.001, "data.cache_dir": str(tmp_path / "cache"),
        "train.epochs": 1, "eval.iw_samples": 0, "eval.tsne_points": 0, "eval.probe": False,
        "eval.dis_samples": 0.01, "eval.dci_importance": "random_forest"})
    logs = MemoryRuns(tmp_path / "runs")
    outcome = run(runspec, "dsprites_figures", logs, show_progress=False)
    names = {p.name for p in (logs.runs[outcome.run_id].folder / "figures").iterdir()}
    assert {"factor_mi.png", "factor_traversals.png"} <= names
    settings = json.loads(logs.runs[outcome.run_id].tags["vaelab.eval.disentanglement"])
    assert settings["metrics"]["dci"]["importance"] == "random_forest"
    assert "RandomForestClassifier" in settings["metrics"]["dci"]["estimator"]
