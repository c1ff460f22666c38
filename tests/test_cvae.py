"""Conditional VAEs: every architecture takes labels, round-trips through a
checkpoint, and trains end to end as a run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_run
from vaelab.checkpoint import load_checkpoint
from vaelab.models.build import build_model
from vaelab.registry import ARCHITECTURES
from vaelab.runlog import MemoryRuns
from vaelab.runner import run
from vaelab.spec import RunSpec


def conditional(arch: str) -> RunSpec:
    base = RunSpec()
    return dataclasses.replace(base, model=dataclasses.replace(base.model, arch=arch, z_dim=4, hidden=(32,),
                                                               conditional=True))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_labels_enter_encoder_and_decoder(arch):
    torch.manual_seed(0)
    model = build_model(conditional(arch), (1, 28, 28))
    assert model.num_classes == 10  # Fashion-MNIST's classes
    x, y = torch.rand(3, 1, 28, 28), torch.tensor([0, 4, 9])
    out = model(x, y=y)
    assert out.params.shape == x.shape and out.mu.shape == (3, 4)
    with pytest.raises(ValueError, match="needs the labels"):
        model.encode(x)
    z = torch.zeros(2, 4)
    assert not torch.allclose(model.decode(z, torch.tensor([1, 1])), model.decode(z, torch.tensor([7, 7])))
    assert not torch.allclose(model.encode(x, y)[0], model.encode(x, torch.tensor([1, 1, 1]))[0])


def test_unconditional_models_ignore_labels():
    torch.manual_seed(0)
    model = build_model(RunSpec(), (1, 28, 28))
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(model.encode(x)[0], model.encode(x, torch.tensor([3, 5]))[0])


def test_conditional_run_finishes_and_its_checkpoint_reloads(mnist_root: Path, tmp_path: Path):
    spec = tiny_run(mnist_root, model={"conditional": True, "arch": "conv"})
    logs = MemoryRuns(tmp_path / "runs")
    outcome = run(spec, "cvae", logs, show_progress=False)
    assert logs.runs[outcome.run_id].status == "FINISHED"
    checkpoint = load_checkpoint(outcome.checkpoint_dir)
    assert checkpoint.model.num_classes == 10
    z = torch.zeros(1, spec.model.z_dim)
    assert checkpoint.model.decode(z, torch.tensor([2])).shape == (1, 1, 28, 28)
