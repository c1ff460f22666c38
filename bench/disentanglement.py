"""The bench's disentanglement section: what one epoch over the whole dSprites grid costs per
objective (the study's conv VAE, batch 64), how fast the grid renders, and how long each metric
takes at disentanglement_lib's sample sizes.

An epoch is timed on a slice of rendered dSprites images through vaelab's own training loop and
scaled to the 737,280 images of the grid (the step cost does not depend on which images it sees).
The metrics score an untrained encoder: their cost is sampling, rendering, encoding and fitting,
which do not depend on how good the code is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vaelab.data import ImageData, Split
from vaelab.data.dsprites import DSprites
from vaelab.data.store import ResidentImages
from vaelab.disentanglement import metrics as dis
from vaelab.spec import RunSpec, with_values
from vaelab.training import fit, init_model

GRID_IMAGES = 737_280
OBJECTIVES = (("beta_vae", {}), ("beta_tcvae", {"loss.beta": 6.0}), ("factorvae", {"loss.factor_gamma": 10.0}),
              ("dip_vae_i", {"loss.dip_lambda_od": 10.0}))


@dataclass(frozen=True)
class DisSettings:
    train_images: int  # images of the timed epoch (a slice of the grid)
    render_images: int
    share: float  # of disentanglement_lib's sample sizes, for the metric timings


FULL = DisSettings(train_images=64 * 30, render_images=20_000, share=0.1)
QUICK = DisSettings(train_images=64 * 4, render_images=500, share=0.01)


def _run(device: torch.device, objective: str, overrides: dict) -> RunSpec:
    return with_values(RunSpec(), {"data.dataset": "dsprites", "model.arch": "conv", "model.z_dim": 10,
                                   "train.batch_size": 64, "train.lr": 5e-4, "train.epochs": 1,
                                   "train.device": device.type, "train.patience": None,
                                   "train.checkpoint_every": 0, "loss.objective": objective, **overrides})


def _grid_slice(n: int, device: torch.device) -> ImageData:
    data = DSprites()
    rows = np.random.default_rng(0).choice(GRID_IMAGES, size=n + 64, replace=False)
    images = torch.from_numpy(data.binary_images(data.factors_at(rows))[:, None] * np.uint8(255)).to(device)
    labels = torch.from_numpy(data.factors_at(rows)[:, 0]).to(device)
    train, val = Split(ResidentImages(images[:n]), labels[:n]), Split(ResidentImages(images[n:]), labels[n:])
    return ImageData(train=train, val=val, test=val, shape=(1, 64, 64), class_names=("square", "ellipse", "heart"),
                     description="dSprites slice", name="dsprites")


def epoch_rows(device: torch.device, settings: DisSettings) -> list[dict]:
    data = _grid_slice(settings.train_images, device)
    rows = []
    for objective, overrides in OBJECTIVES:
        run = _run(device, objective, overrides)
        fit(run, init_model(run, data.shape, device), data, show_progress=False)  # warm-up (allocations)
        history = fit(run, init_model(run, data.shape, device), data, show_progress=False).history
        seconds = history[0]["time/epoch_s"]
        per_image = seconds / settings.train_images
        label = objective + (" (discriminator 6 x 1000)" if objective == "factorvae" else "")
        rows.append({"device": device.type, "objective": label, "timed images": settings.train_images,
                     "ms per batch of 64": 1000 * per_image * 64,
                     "full-grid epoch (min)": per_image * GRID_IMAGES / 60})
    return rows


def render_rate(settings: DisSettings) -> dict:
    data = DSprites()
    factors = data.sample_factors(settings.render_images, np.random.default_rng(0))
    started = time.perf_counter()
    data.images(factors)
    seconds = time.perf_counter() - started
    rate = settings.render_images / seconds
    return {"images": settings.render_images, "images/s": rate, "whole grid (s)": GRID_IMAGES / rate}


def metric_rows(device: torch.device, settings: DisSettings, grid_cache: Path | None = None) -> list[dict]:
    """Each metric's time. With `grid_cache`, images come from the whole grid rendered once into it, as a run
    at the reference sizes reads them (they ask for more images than the grid has); else rendered on demand."""
    run = _run(device, "beta_vae", {})
    model = init_model(run, (1, 64, 64), device).eval()
    data = DSprites()
    if grid_cache is not None:
        data.use_grid_cache(grid_cache)

    def encode(observations: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model.encode(torch.as_tensor(observations, device=device))[0].double().cpu().numpy()

    rows = []
    plan = [(name, {}) for name in dis.METRICS if name != "dci"]
    plan[4:4] = [("dci", {"importance": "gbt"}), ("dci", {"importance": "random_forest"})]
    for name, extra in plan:
        defaults = dis.metric_settings(name)
        sizes = {k: max(10, round(defaults[k] * settings.share)) for k in
                 ("num_train", "num_eval", "num_test", "num_variance_estimate") if k in defaults}
        started = time.perf_counter()
        dis.METRICS[name](data, encode, np.random.default_rng(0), **sizes, **extra)
        seconds = time.perf_counter() - started
        label = name + (f" ({extra['importance']})" if extra else "")
        rows.append({"device": device.type, "metric": label,
                     "images encoded": dis.images_encoded(name, **sizes),
                     "samples": ", ".join(f"{k}={v}" for k, v in sizes.items()), "seconds": seconds,
                     "at reference sizes (s, scaled)": seconds / settings.share})
    return rows


def lines(epochs: list[dict], render: dict, metric_table: list[dict], settings: DisSettings, table) -> list[str]:
    return [
        "## Disentanglement: dSprites epochs and metrics",
        "",
        f"One epoch over the whole dSprites grid ({GRID_IMAGES:,} images) for the disentanglement study's "
        "model (conv, z_dim 10, batch 64, Adam 5e-4), per objective: one timed epoch (after a warm-up epoch) over "
        f"{settings.train_images} rendered grid images through vaelab's training loop, scaled to the grid. "
        f"Rendering the grid (no npz file): **{render['images/s']:.0f} images/s** on one core, "
        f"{render['whole grid (s)'] / 60:.1f} min for the whole grid (done once; the cache keeps it).",
        "",
        table(epochs),
        "",
        f"Each metric at {settings.share:g} of disentanglement_lib's sample sizes on an untrained encoder "
        "(sampling, reading the images from the grid rendered once into the cache, as runs at the reference "
        "sizes do, encoding and fitting; the cost does not depend on the code's quality), and that time "
        "scaled linearly to the reference sizes (`eval.dis_samples: 1`). DCI "
        "fits its per-factor predictors in threads, one per core. `eval.dci_importance: random_forest` is "
        "the fast option; gbt is the reference's estimator. The FactorVAE score stops early when no latent is "
        "active, as on an untrained encoder: its row is a lower bound.",
        "",
        table(metric_table),
        "",
    ]
