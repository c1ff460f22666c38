"""A spec's model, built from the registry's architecture and likelihood records."""

from __future__ import annotations

import dataclasses
from typing import Any

from vaelab import registry
from vaelab.errors import SpecError
from vaelab.likelihoods import Likelihood
from vaelab.models.vae import VAE


def build_model(run_spec: Any, shape: tuple[int, int, int], n_classes: int | None = None) -> VAE:
    """The spec's VAE; a conditional one (model.conditional) takes `n_classes` labels,
    by default as many as its dataset has."""
    model = run_spec.model
    build = registry.ARCHITECTURES[model.arch].build
    if model.levels == 2:
        return registry.resolve("vaelab.models.hvae:build_hvae")(shape, model, build_likelihood(run_spec, shape),
                                                               build_prior(model, shape))
    if not model.conditional:
        encoder, decoder = build(shape, model)
        return VAE(encoder, decoder, model.z_dim, build_likelihood(run_spec, shape), prior=build_prior(model, shape))
    k = n_classes or check_labels(run_spec)
    encoder, _ = build((shape[0] + k, *shape[1:]), model)  # label planes beside the image
    _, decoder = build(shape, dataclasses.replace(model, z_dim=model.z_dim + k))  # one-hot beside z
    return VAE(encoder, decoder, model.z_dim, build_likelihood(run_spec, shape), num_classes=k)


def check_labels(run_spec: Any) -> int:
    """The classes a conditional model (model.conditional) is given, from the data's source record (no image
    decoded); 0 for an unconditional one. Fewer than 2 is refused in one line: a one-class "CVAE" is an
    unconditional VAE with a constant input, and nothing says so."""
    if not run_spec.model.conditional:
        return 0
    k = registry.num_classes(run_spec.data)
    if k < 2 and registry.split_sizes(run_spec.data)["train"]:  # data not there at all: loading says so
        raise SpecError(f"model.conditional: a conditional VAE needs class labels, and data.dataset "
                        f"{run_spec.data.dataset} gives its images {k} class (no labels); leave model.conditional "
                        "out, or use labelled data")
    return k


def build_likelihood(run_spec: Any, shape: tuple[int, int, int]) -> Likelihood:
    return registry.LIKELIHOODS[run_spec.loss.likelihood].build(run_spec.loss, shape)


def build_prior(model_spec: Any, shape: tuple[int, int, int]) -> Any:
    """The model's p(z) (model.prior: vaelab.models.priors), on the top latent."""
    return registry.PRIORS[model_spec.prior].build(model_spec, shape)
