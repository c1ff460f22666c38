"""A rough cost for `--dry-run`: time a few real optimiser steps of the run's
model on random data, then scale by the number of batches and epochs."""

from __future__ import annotations

import math
import time

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
