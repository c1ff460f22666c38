"""The test-metric families as evaluators: each has a name, says when it does not
apply to a run's data, states its estimator settings (which travel with its
metrics), its cost in image passes (for progress and `--dry-run`), and computes
its `test/...` metrics. All numbers in nats per image unless named otherwise."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vaelab.data import ImageData
from vaelab.evaluate import (
    active_units,
    bits_per_dim,
    importance_weighted_nll,
    kl_per_dimension,
    latent_means,
    probe_accuracy,
    split_terms,
)
from vaelab.models import VAE
from vaelab.objectives import kl_weighting
from vaelab.spec import RunSpec

# The IWAE subset is drawn from this seed, not from train.seed, so every run of a study
# is scored on the same test images.
IW_SUBSET_SEED = 0
# Below this many images the IWAE estimate says little; the training-cost cap stops here.
IW_MIN_IMAGES = 100
# A training step costs about three forward passes (forward, and backward at twice that).
PASSES_PER_TRAINING_IMAGE = 3
PROBE_TRAIN_IMAGES = 10_000


@dataclass
class EvalContext:
    """What evaluators read: the trained model, its data, its run and how long it trained."""

    model: VAE
    data: ImageData
    run: RunSpec
    epochs_run: int

    @property
    def seed(self) -> int:
        return self.run.train.seed + 1  # the test evaluation's noise (train.seed orders batches, + 2 is validation)

    def generator(self) -> torch.Generator:
        return torch.Generator(device=self.data.test.x.device).manual_seed(self.seed)


Progress = Callable[[int], None]  # told of each batch of images done


@dataclass(frozen=True)
class Evaluator:
    name: str
    summary: str
    skip_reason: Callable[[EvalContext], str | None]
    settings: Callable[[EvalContext], dict[str, Any]]
    passes: Callable[[EvalContext, dict[str, Any]], int]  # image passes through encoder/decoder, for ETA and cost
    compute: Callable[[EvalContext, dict[str, Any], Progress], dict[str, float]]
    per_image: Callable[[dict[str, Any]], int] = lambda settings: 1  # passes per image its progress reports


def _always(_ctx: EvalContext) -> str | None:
    return None


# ---- elbo: the negative ELBO and its parts over the whole test split --------------------------------
def _elbo_settings(ctx: EvalContext) -> dict[str, Any]:
    return {"images": len(ctx.data.test), "samples": 1, "seed": ctx.seed}


def _elbo(ctx: EvalContext, _settings: dict, progress: Progress) -> dict[str, float]:
    terms = split_terms(ctx.model, ctx.data.test, ctx.model.likelihood, kl_weighting(ctx.run),
                        ctx.run.eval.batch_size, ctx.generator())
    progress(len(ctx.data.test))
    return {f"test/{k}": v for k, v in terms.items()}


# ---- latents: active units and KL per dimension -----------------------------------------------------
def _latents(ctx: EvalContext, _settings: dict, progress: Progress) -> dict[str, float]:
    test, batch = ctx.data.test, ctx.run.eval.batch_size
    means = latent_means(ctx.model, test.x, batch, test.y)
    metrics = {"test/active_units": float(active_units(means))}
    per_dim = kl_per_dimension(ctx.model, test.x, batch, test.y)
    metrics.update({f"test/kl_dim/{d}": float(v) for d, v in enumerate(per_dim.tolist())})
    progress(len(test))
    return metrics


# ---- iwae: the importance-weighted NLL (Burda et al. 2016) ------------------------------------------
def iw_images(ctx: EvalContext) -> int:
    """How many test images the IWAE estimate uses: eval.iw_images (null: all), capped
    by eval.iw_capped so that it costs no more passes than training did."""
    spec, n_test = ctx.run.eval, len(ctx.data.test)
    n = min(n_test, spec.iw_images or n_test)
    if spec.iw_capped and spec.iw_samples:
        trained = PASSES_PER_TRAINING_IMAGE * ctx.epochs_run * len(ctx.data.train)
        n = min(n, max(IW_MIN_IMAGES, trained // spec.iw_samples))
    return max(1, n)


def _iwae_skip(ctx: EvalContext) -> str | None:
    return "eval.iw_samples is 0" if ctx.run.eval.iw_samples == 0 else None


def _iwae_settings(ctx: EvalContext) -> dict[str, Any]:
    n = iw_images(ctx)
    return {"k": ctx.run.eval.iw_samples, "images": n, "of": len(ctx.data.test),
            "subset_seed": IW_SUBSET_SEED if n < len(ctx.data.test) else None, "seed": ctx.seed,
            "bits": "probability of each 8-bit bin" if not ctx.model.likelihood.discrete else "probability mass"}


def iw_subset(n_test: int, n: int) -> torch.Tensor:
    """The same n test images for every run: a seeded choice, in test order."""
    if n >= n_test:
        return torch.arange(n_test)
    return torch.randperm(n_test, generator=torch.Generator().manual_seed(IW_SUBSET_SEED))[:n].sort().values


def _iwae(ctx: EvalContext, settings: dict, progress: Progress) -> dict[str, float]:
    test = ctx.data.test
    idx = iw_subset(len(test), settings["images"])
    nll = importance_weighted_nll(ctx.model, test.x.subset(idx.numpy()), ctx.model.likelihood, settings["k"],
                                  ctx.generator(), y=test.y[idx.to(test.y.device)], on_batch=progress).double()
    mean = float(nll.mean())
    se = float(nll.std() / math.sqrt(len(nll))) if len(nll) > 1 else 0.0
    pixels = math.prod(test.x.shape)
    return {"test/nll_iw": mean, "test/nll_iw_se": se,
            "test/bits_per_dim": bits_per_dim(mean, pixels, ctx.model.likelihood.discrete)}


# ---- probe: how linearly the classes can be read off the latent means --------------------------------
def _probe_skip(ctx: EvalContext) -> str | None:
    if not ctx.run.eval.probe:
        return "eval.probe is false"
    train, test = ctx.data.train, ctx.data.test
    if len(train) < 20:
        return f"{len(train)} training images (the probe needs 20)"
    if len(torch.unique(train.y[:PROBE_TRAIN_IMAGES])) < 2 or len(torch.unique(test.y)) < 2:
        return "the data has fewer than 2 classes (no labels to probe)"
    return None


def _probe_settings(ctx: EvalContext) -> dict[str, Any]:
    return {"train_images": min(PROBE_TRAIN_IMAGES, len(ctx.data.train)), "test_images": len(ctx.data.test),
            "classifier": "logistic regression on standardised latent means"}


def _probe(ctx: EvalContext, settings: dict, progress: Progress) -> dict[str, float]:
    train, test, batch = ctx.data.train, ctx.data.test, ctx.run.eval.batch_size
    n = settings["train_images"]
    train_means = latent_means(ctx.model, train.x.first(n), batch, train.y[:n])
    test_means = latent_means(ctx.model, test.x, batch, test.y)
    progress(n + len(test))
    return {"test/probe_acc": probe_accuracy(train_means, train.y[:n], test_means, test.y)}


# ---- disentanglement: scores against ground-truth factors (vaelab.disentanglement.metrics) ----------
# The headline number of each metric family, and its other parts, as test/dis/<name>.
DIS_NAMES = {
    "beta_vae": {"eval_accuracy": "beta_vae", "train_accuracy": "beta_vae_train"},
    "factor_vae": {"eval_accuracy": "factor_vae", "train_accuracy": "factor_vae_train",
                   "num_active_dims": "factor_vae_active_dims"},
    "mig": {"discrete_mig": "mig"},
    "sap": {"sap_score": "sap"},
    "dci": {"disentanglement": "dci_disentanglement", "completeness": "dci_completeness",
            "informativeness_test": "dci_informativeness", "informativeness_train": "dci_informativeness_train"},
    "modularity_explicitness": {"modularity_score": "modularity", "explicitness_score_test": "explicitness",
                                "explicitness_score_train": "explicitness_train"},
}
_SIZES = ("num_train", "num_eval", "num_test", "num_variance_estimate")


def _dis_skip(ctx: EvalContext) -> str | None:
    if ctx.run.eval.disentanglement is False:
        return "eval.disentanglement is false"
    if ctx.data.factors is None:
        return "the data has no ground-truth factors (data.dataset: dsprites has)"
    if ctx.model.num_classes:
        return "a conditional model's code depends on its label"
    return None


def _dis_settings(ctx: EvalContext) -> dict[str, Any]:
    from vaelab.disentanglement.metrics import METRICS, metric_settings

    share, out = ctx.run.eval.dis_samples, {}
    for name in METRICS:
        defaults = metric_settings(name)
        scaled: dict[str, Any] = {k: max(10, int(round(defaults[k] * share))) for k in _SIZES if k in defaults}
        if name == "dci":
            scaled["importance"] = ctx.run.eval.dci_importance
        out[name] = metric_settings(name, **scaled)
    return {"seed": ctx.seed, "share_of_reference_sizes": share, "metrics": out}


def _dis_passes(_ctx: EvalContext, settings: dict[str, Any]) -> int:
    return sum(int(m["images_encoded"]) for m in settings["metrics"].values())


def _dis(ctx: EvalContext, settings: dict, progress: Progress) -> dict[str, float]:
    import warnings

    import numpy as np
    from sklearn.exceptions import ConvergenceWarning

    from vaelab.disentanglement.metrics import METRICS

    model, device = ctx.model, ctx.data.test.x.device
    model.eval()
    factors = ctx.data.factors
    # Rendering on demand costs more than rendering the grid once when the metrics ask for more images
    # than the grid has (disentanglement_lib's sizes: about 2.2 million for dSprites' 737,280).
    if _dis_passes(ctx, settings) > getattr(factors, "num_images", math.inf) and hasattr(factors, "use_grid_cache"):
        factors.use_grid_cache(ctx.run.data.cache_dir, show_progress=True)

    def encode(observations: Any) -> Any:
        with torch.inference_mode():
            x = torch.as_tensor(observations, dtype=torch.float32, device=device)
            means = model.encode(x)[0].double().cpu().numpy()
        progress(len(x))
        return means

    metrics: dict[str, float] = {}
    with warnings.catch_warnings():
        # The reference's classifiers stop at scikit-learn's default iterations (their settings say
        # so); a warning per classifier would bury the progress bars.
        warnings.simplefilter("ignore", ConvergenceWarning)
        for name, fn in METRICS.items():
            params = {k: v for k, v in settings["metrics"][name].items() if k in (*_SIZES, "importance")}
            scores = fn(factors, encode, np.random.default_rng(settings["seed"]), **params)
            metrics.update({f"test/dis/{DIS_NAMES[name][k]}": float(v) for k, v in scores.items()
                            if k in DIS_NAMES[name]})
    return metrics


EVALUATORS: dict[str, Evaluator] = {e.name: e for e in (
    Evaluator("elbo", "test/elbo, recon, kl, loss, mse over the whole test split", _always, _elbo_settings,
              lambda ctx, s: s["images"], _elbo),
    Evaluator("latents", "test/active_units (Burda et al. 2016) and test/kl_dim/<d>", _always,
              lambda ctx: {"images": len(ctx.data.test)}, lambda ctx, s: s["images"], _latents),
    Evaluator("iwae", "test/nll_iw (importance-weighted NLL), its standard error, test/bits_per_dim", _iwae_skip,
              _iwae_settings, lambda ctx, s: s["k"] * s["images"], _iwae, per_image=lambda s: s["k"]),
    Evaluator("probe", "test/probe_acc (logistic regression on latent means)", _probe_skip, _probe_settings,
              lambda ctx, s: s["train_images"] + s["test_images"], _probe),
    Evaluator("disentanglement", "test/dis/* (BetaVAE, FactorVAE, MIG, SAP, DCI, modularity) against the "
              "ground-truth factors", _dis_skip, _dis_settings, _dis_passes, _dis),
)}
