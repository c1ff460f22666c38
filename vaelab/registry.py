"""Name -> builder tables: the names a spec may use for datasets, architectures
and likelihoods. Adding an entry here is all it takes to make a name valid."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from torch import nn

from vaelab.data import ImageData, load_data, load_image_folder
from vaelab.data.image_folder import image_count
from vaelab.likelihoods import LIKELIHOODS, Likelihood
from vaelab.models import VAE
from vaelab.models.conv import build_conv
from vaelab.models.mlp import build_mlp
from vaelab.models.resnet import build_resnet

# dataset name -> (loader(data_spec, device) -> ImageData, data_spec -> image shape (C, H, W))
DATASETS: dict[str, tuple[Callable[..., ImageData], Callable[..., tuple[int, int, int]]]] = {
    "fashion_mnist": (load_data, lambda spec: (1, 28, 28)),
    "mnist": (load_data, lambda spec: (1, 28, 28)),
    "image_folder": (load_image_folder, lambda spec: (spec.channels, spec.image_size, spec.image_size)),
}

ARCHITECTURES: dict[str, Callable[..., tuple[nn.Module, nn.Module]]] = {
    "mlp": build_mlp,
    "conv": build_conv,
    "resnet": build_resnet,
}

REGISTRIES = {"dataset": DATASETS, "arch": ARCHITECTURES, "likelihood": LIKELIHOODS}


def image_shape(data_spec) -> tuple[int, int, int]:
    """The (C, H, W) a dataset yields, known from the spec alone (so a
    checkpoint can rebuild its model without loading data)."""
    return DATASETS[data_spec.dataset][1](data_spec)


def train_size(data_spec) -> int:
    """Training images after the subset and the validation split, without loading data."""
    if data_spec.dataset == "image_folder":
        official = image_count(Path(data_spec.root))
    else:
        official = 60_000
    n = min(official, data_spec.subset or official)
    return n - int(round(n * data_spec.val_fraction))


def num_classes(data_spec) -> int:
    """Classes a dataset labels its images with (image folders: class subfolders, at least 1)."""
    if data_spec.dataset != "image_folder":
        return 10
    root = Path(data_spec.root)
    folder = root / "train" if (root / "train").is_dir() and (root / "test").is_dir() else root
    if not folder.is_dir():
        return 1
    return max(1, sum(1 for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")))


def build_model(run_spec, shape: tuple[int, int, int], n_classes: int | None = None) -> VAE:
    """The spec's VAE; a conditional one (model.conditional) takes `n_classes` labels,
    by default as many as its dataset has."""
    model = run_spec.model
    build = ARCHITECTURES[model.arch]
    if not model.conditional:
        encoder, decoder = build(shape, model)
        return VAE(encoder, decoder, model.z_dim, build_likelihood(run_spec, shape))
    k = n_classes or num_classes(run_spec.data)
    encoder, _ = build((shape[0] + k, *shape[1:]), model)  # label planes beside the image
    _, decoder = build(shape, dataclasses.replace(model, z_dim=model.z_dim + k))  # one-hot beside z
    return VAE(encoder, decoder, model.z_dim, build_likelihood(run_spec, shape), num_classes=k)


def build_likelihood(run_spec, shape: tuple[int, int, int]) -> Likelihood:
    return LIKELIHOODS[run_spec.loss.likelihood](run_spec.loss, shape)


def load_dataset(data_spec, device) -> ImageData:
    return DATASETS[data_spec.dataset][0](data_spec, device)
