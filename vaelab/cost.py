"""A rough cost for `--dry-run`: time a few real optimiser steps of the run's
model on random data, then scale by the number of batches and epochs; time
inference passes (and what evaluators time themselves) and a small t-SNE, then
scale by the image passes each evaluator's settings will make."""

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
    """Seconds the default evaluation of `run` will take on this machine: each evaluator the spec
    does not turn off, its image passes (from its settings, as the run will have them) over a
    measured rate (the plain inference rate, or the one the evaluator measures itself), plus
    the figures (a measured small t-SNE)."""
    from vaelab.evaluation.evaluators import EVALUATORS
    from vaelab.evaluation.record import Facts, Rate

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
    # As the run will see it after all its epochs (early stopping can only make it cheaper).
    facts = Facts(run, train_size(run.data), test_images, run.train.epochs, bool(model.likelihood.discrete))
    seconds = {}
    for evaluator in EVALUATORS.values():
        if evaluator.turned_off(run) is not None:
            continue
        settings = evaluator.settings(facts)
        measured = (Rate(rate, evaluator.fixed_s) if evaluator.measure is None
                    else evaluator.measure(model, x, facts, settings))
        seconds[evaluator.name] = measured.seconds(evaluator.passes(settings))
    e = run.eval
    if e.figures:
        seconds["figures"] = _tsne_seconds(min(e.tsne_points, test_images), run.model.z_dim) + 3.0  # + the plots
    return EvaluationCost(seconds, rate)


def _tsne_seconds(points: int, z_dim: int) -> float:
    """t-SNE of `points` random latent means, timed (its fixed costs dominate: it does not scale down)."""
    if points < 10:
        return 0.0
    from vaelab.figures import tsne_embedding

    started = time.perf_counter()
    tsne_embedding(torch.randn(points, z_dim), seed=0)
    return time.perf_counter() - started
