from __future__ import annotations

import dataclasses

import pytest
import torch

from vaelab.models import ConfigError
from vaelab.models.build import build_model
from vaelab.preflight import check
from vaelab.spec import RunSpec


def model_for(arch: str, **model):
    base = RunSpec()
    return build_model(dataclasses.replace(base, model=dataclasses.replace(base.model, arch=arch, **model)),
                       (1, 28, 28))


def test_counts_parameters_and_estimates_activations():
    result = check(model_for("mlp"), (1, 28, 28), 128, torch.device("cpu"))
    assert result.n_params == (784 * 400 + 400) + (400 * 40 + 40) + (20 * 400 + 400) + (400 * 784 + 784)
    # Per example the MLP produces 400 + 400 + 40 + 400 + 400 + 784 activations (linear and ReLU outputs).
    expected_mb = (400 + 400 + 40 + 400 + 400 + 784) * 128 * 4 * 2 / 2**20
    assert result.activation_mb == pytest.approx(expected_mb, rel=1e-6)


def test_a_model_that_does_not_fit_the_images_fails_fast():
    model = model_for("conv", channels=(8, 8))
    with pytest.raises(ConfigError, match=r"model does not fit images of shape \(3, 28, 28\)"):
        check(model, (3, 28, 28), 16, torch.device("cpu"))


def test_a_batch_too_large_for_memory_is_refused():
    with pytest.raises(ConfigError, match="lower train.batch_size"):
        check(model_for("conv"), (1, 28, 28), 500_000_000, torch.device("cpu"))
