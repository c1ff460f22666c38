"""The compiled training step (train.compile) against the eager one, on CPU."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_run
from vaelab.data import load_data
from vaelab.spec import with_values
from vaelab.training import fit, init_model
from vaelab.training.step import StepTerms

CPU = torch.device("cpu")


def test_compiled_step_trains_like_the_eager_one(mnist_root: Path):
    eager_run = tiny_run(mnist_root, train={"epochs": 2, "batch_size": 64, "device": "cpu", "patience": None})
    compiled_run = with_values(eager_run, {"train.compile": True})
    data = load_data(eager_run.data, CPU)
    eager_model = init_model(eager_run, data.shape, CPU)
    eager = fit(eager_run, eager_model, data, show_progress=False)
    compiled_model = init_model(compiled_run, data.shape, CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would warn: fail instead
        compiled = fit(compiled_run, compiled_model, data, show_progress=False)
    for mine, theirs in zip(compiled.history, eager.history, strict=True):
        for key in ("train/loss", "train/recon", "train/kl", "val/loss", "val/elbo"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4), key
    for a, b in zip(compiled_model.parameters(), eager_model.parameters(), strict=True):
        assert (a - b).abs().max() < 1e-2


def test_a_step_that_fails_to_compile_falls_back_to_eager(mnist_root: Path):
    run = tiny_run(mnist_root)
    model = init_model(run, (1, 28, 28), CPU)
    terms = StepTerms(model, model.likelihood, compile=True)

    def broken(*_args):
        raise RuntimeError("backend exploded")

    terms.fn = broken  # what a failing inductor looks like from here
    x, y, noise = torch.rand(5, 1, 28, 28), torch.zeros(5, dtype=torch.long), torch.randn(5, run.model.z_dim)
    with pytest.warns(RuntimeWarning, match="backend exploded"):
        recon, kl_dims, _, _ = terms(x, y, noise)
    assert not terms.compiled
    expected = StepTerms(model, model.likelihood)(x, y, noise)
    assert torch.equal(recon, expected[0]) and torch.equal(kl_dims, expected[1])
