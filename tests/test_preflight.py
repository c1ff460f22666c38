from __future__ import annotations

import dataclasses

import pytest
import torch

from vaelab.models import ConfigError
from vaelab.preflight import check, dry_forward, meta_model
from vaelab.spec import RunSpec

CPU = torch.device("cpu")


def run_for(arch: str, batch_size: int = 128, **model) -> RunSpec:
    base = RunSpec()
    return dataclasses.replace(base, model=dataclasses.replace(base.model, arch=arch, **model),
                               train=dataclasses.replace(base.train, batch_size=batch_size))


def test_counts_parameters_and_estimates_a_training_batch():
    result = check([run_for("mlp")], (1, 28, 28), 1000, 100, CPU)
    assert result.n_params == (784 * 400 + 400) + (400 * 40 + 40) + (20 * 400 + 400) + (400 * 784 + 784)
    # A step's tensors grow with the batch: twice the batch, twice the activations.
    double = check([run_for("mlp", batch_size=256)], (1, 28, 28), 1000, 100, CPU)
    assert double.activation_mb == pytest.approx(2 * result.activation_mb, rel=1e-6)
    assert result.activation_mb > 0


def test_a_model_that_does_not_fit_the_images_fails_fast():
    # Built for grey images, given colour ones: the dry forward (on the meta device) fails in one line.
    model = meta_model(run_for("conv", channels=(8, 8)), (1, 28, 28))
    with pytest.raises(ConfigError, match=r"model does not fit images of shape \(3, 28, 28\)") as err:
        dry_forward(model, (3, 28, 28))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="model.channels: 3 stride-2 stages need image sides divisible by 8"):
        check([run_for("conv", channels=(8, 8, 8))], (3, 28, 28), 100, 10, CPU)


def test_a_batch_too_large_for_memory_is_refused():
    with pytest.raises(ConfigError, match="lower train.batch_size"):
        check([run_for("conv", batch_size=500_000_000)], (1, 28, 28), 600_000_000, 100, CPU)
