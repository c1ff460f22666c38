"""The names a spec may use for datasets, architectures and likelihoods, as records.

Each record names what it stands for as a "module:attribute" string that is imported on
first use, so the names (what a spec is checked against, what `vaelab keys` lists) are
known without importing torch, the models or the data code. Adding a record here is all it
takes to make a name valid. This module imports nothing of vaelab: anything may import it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vaelab.data.model import ImageData
    from vaelab.data.sources.base import Source


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


@dataclass(frozen=True)
class Dataset:
    """A data.dataset name and its `vaelab.data.sources` record (a "module:attribute" string; the
    record's module imports no torch, so its shape, sizes, classes and keys come cheap)."""

    name: str
    target: str

    def source(self) -> Source:
        return resolve(self.target)

    @property
    def factors(self) -> bool:
        return self.source().factors


def _table(*records: Any) -> dict[str, Any]:
    return {record.name: record for record in records}


DATASETS: dict[str, Dataset] = _table(
    Dataset("fashion_mnist", "vaelab.data.sources.mnist_family:FASHION_MNIST"),
    Dataset("mnist", "vaelab.data.sources.mnist_family:MNIST"),
    Dataset("image_folder", "vaelab.data.sources.image_folder:IMAGE_FOLDER"),
    Dataset("huggingface", "vaelab.data.sources.huggingface:HUGGINGFACE"),
    Dataset("dsprites", "vaelab.data.sources.dsprites:DSPRITES"),
)

# builder(image shape, model_spec) -> (encoder, decoder)
ARCHITECTURES: dict[str, Builder] = _table(
    Builder("mlp", "vaelab.models.mlp:build_mlp"),
    Builder("conv", "vaelab.models.conv:build_conv"),
    Builder("resnet", "vaelab.models.resnet:build_resnet"),
)

# builder(loss_spec, image shape) -> Likelihood (vaelab.models.build.build_likelihood)
LIKELIHOODS: dict[str, Builder] = _table(
    Builder("bernoulli", "vaelab.likelihoods:bernoulli"),
    Builder("continuous_bernoulli", "vaelab.likelihoods:continuous_bernoulli"),
    Builder("gaussian", "vaelab.likelihoods:gaussian"),
    Builder("gaussian_learned", "vaelab.likelihoods:gaussian_learned"),
    Builder("laplace", "vaelab.likelihoods:laplace"),
)


@dataclass(frozen=True)
class Prior:
    """A model.prior name, the module that builds it (vaelab.models.priors), what it is in one line, and
    the model.* keys only it reads."""

    name: str
    target: str
    summary: str
    keys: tuple[str, ...] = ()
    # Whether the KL of a diagonal Gaussian posterior to it has a closed form per dimension (free bits, the
    # per-dimension KL figures and metrics, the objectives whose penalty assumes N(0, I) need one).
    closed_form_kl: bool = False

    def build(self, *args: Any, **kwargs: Any) -> Any:
        return resolve(self.target)(*args, **kwargs)


# builder(model_spec, image shape) -> the prior's module (log_prob, sample, kl_dims)
PRIORS: dict[str, Prior] = _table(
    Prior("gaussian", "vaelab.models.priors.gaussian:build", "N(0, I) (Kingma & Welling 2014)", closed_form_kl=True),
    Prior("vamp", "vaelab.models.priors.vamp:build", "VampPrior: a mixture of the encoder's posteriors at "
          "model.prior_components learned pseudo-inputs (Tomczak & Welling 2018)", keys=("model.prior_components",)),
)

# builder(n_in, n_out) -> the modules of one hidden dense layer of an MLP (vaelab.models.dense)
HIDDEN_ACTS: dict[str, Builder] = _table(
    Builder("relu", "vaelab.models.dense:relu_layer"),
    Builder("tanh", "vaelab.models.dense:tanh_layer"),
    Builder("gated", "vaelab.models.gated:gated_layer"),
)

REGISTRIES: dict[str, dict[str, Any]] = {"dataset": DATASETS, "arch": ARCHITECTURES, "likelihood": LIKELIHOODS,
                                         "prior": PRIORS, "hidden_act": HIDDEN_ACTS}


def names(kind: str) -> list[str]:
    """The sorted names of one registry ("dataset", "arch", "likelihood", "prior", "hidden_act"); imports
    nothing."""
    return sorted(REGISTRIES[kind])


def source(name: str) -> Source:
    """The data source record of a data.dataset name (imports its module: no torch)."""
    return DATASETS[name].source()


def image_shape(data_spec: Any) -> tuple[int, int, int]:
    """The (C, H, W) a dataset yields, known from the spec alone (so a
    checkpoint can rebuild its model without loading data)."""
    return source(data_spec.dataset).shape(data_spec)


def split_sizes(data_spec: Any) -> dict[str, int]:
    """Images in train, val and test, without loading data: the source's part sizes through the
    same split policy loading uses."""
    return source(data_spec.dataset).split_sizes(data_spec)


def train_size(data_spec: Any) -> int:
    """Training images after held-out splits and the subset, without loading data."""
    return split_sizes(data_spec)["train"]


def num_classes(data_spec: Any) -> int:
    """Classes a dataset labels its images with (image folders: class subfolders, at least 1)."""
    return source(data_spec.dataset).classes(data_spec)


def load_dataset(data_spec: Any, device: Any, show_progress: bool = True) -> ImageData:
    """The dataset on `device`; decoding into the cache shows a progress bar unless told not to."""
    return resolve("vaelab.data:load_data")(data_spec, device, show_progress=show_progress)


def kl_by_dimension(model_spec: Any) -> bool:
    """Whether a model's KL to its prior splits by code dimension in closed form: a prior with one
    (PRIORS' closed_form_kl) on a single stochastic level."""
    return PRIORS[model_spec.prior].closed_form_kl and model_spec.levels == 1
