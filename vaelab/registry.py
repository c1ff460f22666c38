"""Name -> builder tables: the names a spec may use for datasets, architectures
and likelihoods. Adding an entry here is all it takes to make a name valid."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from vaelab.data import ImageData, load_data
from vaelab.likelihoods import LIKELIHOODS, Likelihood
from vaelab.models import VAE
from vaelab.models.conv import build_conv
from vaelab.models.mlp import build_mlp

# dataset name -> (loader(data_spec, device) -> ImageData, image shape (C, H, W))
DATASETS: dict[str, tuple[Callable[..., ImageData], tuple[int, int, int]]] = {
    "fashion_mnist": (load_data, (1, 28, 28)),
    "mnist": (load_data, (1, 28, 28)),
}

ARCHITECTURES: dict[str, Callable[..., tuple[nn.Module, nn.Module]]] = {
    "mlp": build_mlp,
    "conv": build_conv,
}

REGISTRIES = {"dataset": DATASETS, "arch": ARCHITECTURES, "likelihood": LIKELIHOODS}


def image_shape(data_spec) -> tuple[int, int, int]:
    """The (C, H, W) a dataset yields, known from the spec alone (so a
    checkpoint can rebuild its model without loading data)."""
    return DATASETS[data_spec.dataset][1]


def train_size(data_spec) -> int:
    """Training images after the subset and the validation split, without loading data."""
    official = {"fashion_mnist": 60_000, "mnist": 60_000}[data_spec.dataset]
    n = min(official, data_spec.subset or official)
    return n - int(round(n * data_spec.val_fraction))


def build_model(run_spec, shape: tuple[int, int, int]) -> VAE:
    encoder, decoder = ARCHITECTURES[run_spec.model.arch](shape, run_spec.model)
    return VAE(encoder, decoder, run_spec.model.z_dim, build_likelihood(run_spec, shape))


def build_likelihood(run_spec, shape: tuple[int, int, int]) -> Likelihood:
    return LIKELIHOODS[run_spec.loss.likelihood](run_spec.loss, shape)


def load_dataset(data_spec, device) -> ImageData:
    return DATASETS[data_spec.dataset][0](data_spec, device)
