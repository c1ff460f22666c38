"""A rough cost for `--dry-run`: time a few real optimiser steps of the run's
model on random data, then scale by the number of batches and epochs; time
inference passes and a small t-SNE, then scale by what the evaluation will do."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from vaelab.objectives import vae_terms
from vaelab.registry import image_shape, train_size
from vaelab.spec import RunSpec
from vaelab.training import init_model, make_optimizer, resolve_device


def seconds_per_epoch(run: RunSpec, steps: int = 8) -> float:
    device = resolve_device(run.train.device)
    shape = image_shape(run.data)
    model = init_model(run, shape, device)
    likelihood = model.likelihood
    optimizer = make_optimizer(model, run.train.lr)
    x = torch.rand(run.train.batch_size, *shape, device=device)
    elapsed = 0.0
    for step in range(steps + 2):  # two warm-up steps are not timed
        started = time.perf_counter()
        out = model(x, y=torch.zeros(len(x), dtype=torch.long, device=device))
        loss = vae_terms(x, out.params, out.mu, out.logvar, likelihood, run.loss.beta).objective
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()
        if step >= 2:
            elapsed += time.perf_counter() - started
    n_train = train_size(run.data)
    return elapsed / steps * math.ceil(n_train / run.train.batch_size)


@dataclass
class EvaluationCost:
    seconds: dict[str, float]  # per evaluator, and "figures"
    images_per_s: float  # the measured inference rate (encoder + decoder, one image per pass)

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def evaluation_cost(run: RunSpec, test_images: int = 10_000) -> EvaluationCost:
    """Seconds the default evaluation of `run` will take on this machine, from a
    measured inference rate (and a measured small t-SNE for the figures)."""
    from vaelab.evaluation.evaluators import IW_MIN_IMAGES, PASSES_PER_TRAINING_IMAGE, PROBE_TRAIN_IMAGES

    device = resolve_device(run.train.device)
    shape = image_shape(run.data)
    model = init_model(run, shape, device).eval()
    x = torch.rand(min(run.eval.batch_size, 1024), *shape, device=device)
    y = torch.zeros(len(x), dtype=torch.long, device=device)
    with torch.inference_mode():
        model(x, y=y)  # warm-up
        started = time.perf_counter()
        for _ in range(3):
            model(x, y=y)
        rate = 3 * len(x) / (time.perf_counter() - started)
    e, n_train = run.eval, train_size(run.data)
    seconds = {"elbo": test_images / rate, "latents": 2 * test_images / rate}
    if e.iw_samples:
        images = min(test_images, e.iw_images or test_images)
        if e.iw_capped:
            trained = PASSES_PER_TRAINING_IMAGE * run.train.epochs * n_train
            images = min(images, max(IW_MIN_IMAGES, trained // e.iw_samples))
        seconds["iwae"] = e.iw_samples * images / _iwae_passes_per_s(model, x, e.iw_samples)
    if e.probe:
        seconds["probe"] = (min(PROBE_TRAIN_IMAGES, n_train) + test_images) / rate + 2.0  # + the solver, ~2 s
    if e.figures:
        seconds["figures"] = _tsne_seconds(min(e.tsne_points, test_images), run.model.z_dim) + 3.0  # + the plots
    return EvaluationCost(seconds, rate)


def _iwae_passes_per_s(model, x: torch.Tensor, k: int) -> float:
    """Decoder passes per second of the importance-weighted estimate itself (its large
    decoder batches and log-sum-exp run slower per image than a plain forward pass)."""
    from vaelab.evaluate import importance_weighted_nll

    k = min(k, 256)
    n = max(1, min(len(x), 16_384 // k))
    generator = torch.Generator(device=x.device).manual_seed(0)
    importance_weighted_nll(model, x[:n], model.likelihood, k, generator)  # warm-up
    started = time.perf_counter()
    importance_weighted_nll(model, x[:n], model.likelihood, k, generator)
    return n * k / (time.perf_counter() - started)


def _tsne_seconds(points: int, z_dim: int) -> float:
    """t-SNE of `points` random latent means, timed (its fixed costs dominate: it does not scale down)."""
    if points < 10:
        return 0.0
    from vaelab.figures import tsne_embedding

    started = time.perf_counter()
    tsne_embedding(torch.randn(points, z_dim), seed=0)
    return time.perf_counter() - started
