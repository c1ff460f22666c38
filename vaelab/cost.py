"""A rough cost for `--dry-run`: time a few real optimiser steps of the run's
model on random data (the run's own step: its objective's penalty, the k codes per image of a
k-sample bound), then scale by the number of batches and epochs; time
inference passes (and what evaluators time themselves) and a small t-SNE, then
scale by the image passes each evaluator's settings and the figures will make.
The pre-flight check runs first, so a model too large for memory is refused before it is built,
and every timed batch is one the run's memory budget allows (vaelab.models.footprint)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from vaelab import preflight
from vaelab.models.footprint import attach, rows
from vaelab.objectives import kl_weighting, objective_of, training_loss
from vaelab.registry import image_shape, split_sizes, train_size
from vaelab.spec import RunSpec
from vaelab.training import init_model, make_optimizer, resolve_device
from vaelab.training.step import batch_terms


def _model(run: RunSpec, device: torch.device):  # noqa: ANN202 - a VAE
    """The run's model, after the pre-flight check has found that it fits (its budget attached)."""
    shape, sizes = image_shape(run.data), split_sizes(run.data)
    flight = preflight.check([run], shape, max(1, sizes["train"]), max(1, sizes.get("test", 0)), device)
    model = init_model(run, shape, device)
    attach(model, flight.footprint)
    return model


def seconds_per_epoch(run: RunSpec, steps: int = 8) -> float:
    device = resolve_device(run.train.device)
    shape = image_shape(run.data)
    model = _model(run, device)
    optimizer = make_optimizer(model, run.train.lr)
    n_train = train_size(run.data)
    x = torch.rand(max(1, min(run.train.batch_size, n_train)), *shape, device=device)
    y = torch.zeros(len(x), dtype=torch.long, device=device)
    # The run's step as training takes it (an auxiliary's own step, FactorVAE's discriminator, is not timed).
    objective = objective_of(run).for_run(run, n_train, model.z_dim, device)
    weighting, generator = kl_weighting(run), torch.Generator(device=device).manual_seed(0)
    elapsed = 0.0
    for step in range(steps + 2):  # two warm-up steps are not timed
        started = time.perf_counter()
        noise = torch.randn(objective.noise_shape(len(x), model.noise_dim), generator=generator, device=device)
        drawn = objective.penalty.sample(generator, len(x), model.z_dim, device) if objective.penalty else None
        recon, kl_dims, extra, _ = batch_terms(model, model.likelihood, x, y, noise, run.train.precision == "bf16",
                                               objective.penalty, drawn, objective.gain)
        loss, _ = training_loss(weighting, recon, kl_dims, math.inf, extra)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()
        if step >= 2:
            elapsed += time.perf_counter() - started
    return elapsed / steps * math.ceil(n_train / run.train.batch_size)


@dataclass
class EvaluationCost:
    seconds: dict[str, float]  # per evaluator, and "figures"
    images_per_s: float  # the measured inference rate (encoder + decoder, one image per pass)

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def evaluation_cost(run: RunSpec, test_images: int | None = None) -> EvaluationCost:
    """Seconds the default evaluation of `run` will take on this machine: each evaluator the spec
    does not turn off, its image passes (from its settings, as the run will have them) over a
    measured rate (the plain inference rate, or the one the evaluator measures itself), plus
    the figures (their passes at the plain rate, and a measured small t-SNE). `test_images`: the
    data's test split when None."""
    from vaelab.evaluation.evaluators import EVALUATORS
    from vaelab.evaluation.record import Facts, Rate, settle
    from vaelab.figures import figure_passes

    if test_images is None:
        test_images = max(1, split_sizes(run.data).get("test", 0))
    device = resolve_device(run.train.device)
    shape = image_shape(run.data)
    model = _model(run, device).eval()
    x = torch.rand(rows(model, "forward", min(run.eval.batch_size, 1024)), *shape, device=device)
    y = torch.zeros(len(x), dtype=torch.long, device=device)
    with torch.inference_mode():
        model(x, y=y)  # warm-up
        started = time.perf_counter()
        for _ in range(3):
            model(x, y=y)
        rate = 3 * len(x) / (time.perf_counter() - started)
    # As the run will see it after all its epochs (early stopping can only make it cheaper); the figures'
    # passes are taken first, as the run's own evaluation takes them.
    n_train, epochs = train_size(run.data), run.train.epochs
    drawn = figure_passes(run, n_train, test_images, epochs)
    facts = Facts(run, n_train, test_images, epochs, bool(model.likelihood.discrete), drawn)
    seconds = {}
    for evaluator, settings, _reason in settle(facts, [(e, e.turned_off(run)) for e in EVALUATORS.values()]):
        if settings is None:
            continue
        measured = (Rate(rate, evaluator.fixed_s) if evaluator.measure is None
                    else evaluator.measure(model, x, facts, settings))
        seconds[evaluator.name] = measured.seconds(evaluator.passes(settings))
    e = run.eval
    if e.figures:
        seconds["figures"] = (drawn / rate + _tsne_seconds(min(e.tsne_points, test_images), run.model.z_dim)
                              + 3.0)  # + the plots
    return EvaluationCost(seconds, rate)


def _tsne_seconds(points: int, z_dim: int) -> float:
    """t-SNE of `points` random latent means, timed (its fixed costs dominate: it does not scale down)."""
    if points < 10:
        return 0.0
    from vaelab.figures import tsne_embedding

    started = time.perf_counter()
    tsne_embedding(torch.randn(points, z_dim), seed=0)
    return time.perf_counter() - started
