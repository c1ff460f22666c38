"""The names a spec may use for datasets, architectures and likelihoods, as records.

Each record names its builder as a "module:function" string that is imported on
first use, so the names (what a spec is checked against, what `vaelab keys`
lists) are known without importing torch or the models. Adding a record here is
all it takes to make a name valid.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vaelab.data import ImageData
    from vaelab.likelihoods import Likelihood
    from vaelab.models import VAE


def resolve(target: str) -> Any:
    """The object a "package.module:attribute" string names, imported on first use
    (looked up on each call: the import itself is cached by Python)."""
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class Builder:
    """A name and the function that builds it (a "module:function" string)."""

    name: str
    target: str

    def build(self, *args: Any, **kwargs: Any) -> Any:
        return resolve(self.target)(*args, **kwargs)


def _count(value: int | Callable[[Any], int], data_spec: Any) -> int:
    return value(data_spec) if callable(value) else value


@dataclass(frozen=True)
class Dataset:
    """A dataset: its loader(data_spec, device, show_progress=...) -> ImageData (a "module:function"
    string), the (C, H, W) it yields, its official training-set size and its number
    of classes: each a number, or a function of the data spec (an image folder)."""

    name: str
    loader: str
    shape: Callable[[Any], tuple[int, int, int]]
    train_images: int | Callable[[Any], int]
    classes: int | Callable[[Any], int]
    factors: bool = False  # ground-truth factors of variation (the disentanglement metrics need them)

    def load(self, data_spec: Any, device: Any, show_progress: bool = True) -> ImageData:
        return resolve(self.loader)(data_spec, device, show_progress=show_progress)

    def image_shape(self, data_spec: Any) -> tuple[int, int, int]:
        return self.shape(data_spec)

    def official_size(self, data_spec: Any) -> int:
        return _count(self.train_images, data_spec)

    def num_classes(self, data_spec: Any) -> int:
        return _count(self.classes, data_spec)


def _folder_images(data_spec: Any) -> int:
    """Image files of an image folder's training split, counted without decoding (imports the image code)."""
    return resolve("vaelab.data.image_folder:train_count")(data_spec)


def _folder_classes(data_spec: Any) -> int:
    """Classes of an image folder (at least 1), from its class subfolders."""
    return resolve("vaelab.data.image_folder:class_count")(data_spec)


def _hf_images(data_spec: Any) -> int:
    """Images of a Hugging Face dataset's training split (opens it: imports datasets)."""
    return len(resolve("vaelab.data.huggingface:open_hf")(data_spec.hf, data_spec.splits).splits["train"].labels)


def _dsprites_shape(data_spec: Any) -> tuple[int, int, int]:
    return (1, 64, 64)


def _dsprites_images(data_spec: Any) -> int:
    """Training images before the validation split: the grid less its test part, or data.subset."""
    rest = 737_280 - int(round(737_280 * data_spec.test_fraction))
    return rest if data_spec.subset is None else min(rest, data_spec.subset)


def _hf_classes(data_spec: Any) -> int:
    return len(resolve("vaelab.data.huggingface:open_hf")(data_spec.hf, data_spec.splits).class_names)


def _table(*records: Any) -> dict[str, Any]:
    return {record.name: record for record in records}


def _mnist_shape(data_spec: Any) -> tuple[int, int, int]:
    return (1, 28, 28)


def _folder_shape(data_spec: Any) -> tuple[int, int, int]:
    return (data_spec.channels, data_spec.image_size, data_spec.image_size)


DATASETS: dict[str, Dataset] = _table(
    Dataset("fashion_mnist", "vaelab.data:load_data", _mnist_shape, train_images=60_000, classes=10),
    Dataset("mnist", "vaelab.data:load_data", _mnist_shape, train_images=60_000, classes=10),
    Dataset("image_folder", "vaelab.data:load_image_folder", _folder_shape, train_images=_folder_images,
            classes=_folder_classes),
    Dataset("huggingface", "vaelab.data:load_huggingface", _folder_shape, train_images=_hf_images,
            classes=_hf_classes),
    Dataset("dsprites", "vaelab.data:load_dsprites", _dsprites_shape, train_images=_dsprites_images, classes=3,
            factors=True),
)

# builder(image shape, model_spec) -> (encoder, decoder)
ARCHITECTURES: dict[str, Builder] = _table(
    Builder("mlp", "vaelab.models.mlp:build_mlp"),
    Builder("conv", "vaelab.models.conv:build_conv"),
    Builder("resnet", "vaelab.models.resnet:build_resnet"),
)

# builder(loss_spec, image shape) -> Likelihood; vaelab.likelihoods.LIKELIHOODS is built from this table
LIKELIHOODS: dict[str, Builder] = _table(
    Builder("bernoulli", "vaelab.likelihoods:bernoulli"),
    Builder("continuous_bernoulli", "vaelab.likelihoods:continuous_bernoulli"),
    Builder("gaussian", "vaelab.likelihoods:gaussian"),
    Builder("gaussian_learned", "vaelab.likelihoods:gaussian_learned"),
    Builder("laplace", "vaelab.likelihoods:laplace"),
)

REGISTRIES: dict[str, dict[str, Any]] = {"dataset": DATASETS, "arch": ARCHITECTURES, "likelihood": LIKELIHOODS}


def names(kind: str) -> list[str]:
    """The sorted names of one registry ("dataset", "arch", "likelihood"); imports nothing."""
    return sorted(REGISTRIES[kind])


def image_shape(data_spec) -> tuple[int, int, int]:
    """The (C, H, W) a dataset yields, known from the spec alone (so a
    checkpoint can rebuild its model without loading data)."""
    return DATASETS[data_spec.dataset].image_shape(data_spec)


def train_size(data_spec) -> int:
    """Training images after the subset and the validation split, without loading data."""
    official = DATASETS[data_spec.dataset].official_size(data_spec)
    n = min(official, data_spec.subset or official)
    return n - int(round(n * data_spec.val_fraction))


def num_classes(data_spec) -> int:
    """Classes a dataset labels its images with (image folders: class subfolders, at least 1)."""
    return DATASETS[data_spec.dataset].num_classes(data_spec)


def build_model(run_spec, shape: tuple[int, int, int], n_classes: int | None = None) -> VAE:
    """The spec's VAE; a conditional one (model.conditional) takes `n_classes` labels,
    by default as many as its dataset has."""
    from vaelab.models import VAE

    model = run_spec.model
    build = ARCHITECTURES[model.arch].build
    if not model.conditional:
        encoder, decoder = build(shape, model)
        return VAE(encoder, decoder, model.z_dim, build_likelihood(run_spec, shape))
    k = n_classes or num_classes(run_spec.data)
    encoder, _ = build((shape[0] + k, *shape[1:]), model)  # label planes beside the image
    _, decoder = build(shape, dataclasses.replace(model, z_dim=model.z_dim + k))  # one-hot beside z
    return VAE(encoder, decoder, model.z_dim, build_likelihood(run_spec, shape), num_classes=k)


def build_likelihood(run_spec, shape: tuple[int, int, int]) -> Likelihood:
    return LIKELIHOODS[run_spec.loss.likelihood].build(run_spec.loss, shape)


def load_dataset(data_spec, device, show_progress: bool = True) -> ImageData:
    """The dataset on `device`; decoding into the cache shows a progress bar unless told not to."""
    return DATASETS[data_spec.dataset].load(data_spec, device, show_progress)
