"""The `iwae` evaluator: -log p(x) by importance weighting (Burda et al. 2016, eq. 8) with
eval.iw_samples samples per image, its standard error over images, and bits per dimension.
By default on a seeded subset of the test split that costs no more passes than training did."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from vaelab.evaluation.record import EvalContext, Evaluator, Facts, Metric, Progress, Rate, Settings

if TYPE_CHECKING:
    import torch

    from vaelab.spec import RunSpec

# The subset is drawn from this seed, not from train.seed, so every run of a study is scored on
# the same test images.
IW_SUBSET_SEED = 0
# Below this many images the estimate says little; the training-cost cap stops here.
IW_MIN_IMAGES = 100
# Decoder rows in memory at once while timing the estimate (its own default budget).
_TIMED_ROWS = 16_384


def iw_images(facts: Facts) -> int:
    """How many test images the estimate uses: eval.iw_images (null: all), capped by
    eval.iw_capped so that it costs no more passes than training did."""
    spec, n_test = facts.run.eval, facts.test_images
    n = min(n_test, spec.iw_images or n_test)
    if spec.iw_capped and spec.iw_samples:
        n = min(n, max(IW_MIN_IMAGES, facts.training_passes(facts.epochs_run) // spec.iw_samples))
    return max(1, n)


def iw_subset(n_test: int, n: int) -> torch.Tensor:
    """The same n test images for every run: a seeded choice, in test order."""
    import torch

    if n >= n_test:
        return torch.arange(n_test)
    return torch.randperm(n_test, generator=torch.Generator().manual_seed(IW_SUBSET_SEED))[:n].sort().values


def _turned_off(run: RunSpec) -> str | None:
    return "eval.iw_samples is 0" if run.eval.iw_samples == 0 else None


def _settings(facts: Facts) -> Settings:
    n = iw_images(facts)
    return {"k": facts.run.eval.iw_samples, "images": n, "of": facts.test_images,
            "subset_seed": IW_SUBSET_SEED if n < facts.test_images else None, "seed": facts.seed,
            "bits": "probability mass" if facts.discrete else "probability of each 8-bit bin"}


def _compute(ctx: EvalContext, settings: Settings, progress: Progress) -> dict[str, float]:
    from vaelab.evaluation import estimators

    test = ctx.data.test
    idx = iw_subset(len(test), settings["images"])
    nll = estimators.importance_weighted_nll(ctx.model, test.x.subset(idx.numpy()), ctx.model.likelihood,
                                             settings["k"], ctx.generator(), y=test.y[idx.to(test.y.device)],
                                             on_batch=progress).double()
    mean = float(nll.mean())
    se = float(nll.std() / math.sqrt(len(nll))) if len(nll) > 1 else 0.0
    pixels = math.prod(test.x.shape)
    return {"test/nll_iw": mean, "test/nll_iw_se": se,
            "test/bits_per_dim": estimators.bits_per_dim(mean, pixels, ctx.model.likelihood.discrete)}


def _plan(run: RunSpec) -> str:
    e = run.eval
    images = f"up to {e.iw_images}" if e.iw_images else "every"
    cap = ", no more passes than training took (at least 100 images)" if e.iw_capped else ""
    return f"test/nll_iw (+ _se, bits_per_dim): k={e.iw_samples} on {images} test images{cap}"


def _suffix(settings: Settings) -> str:
    subset = f"_n{settings['images']}" if settings["images"] < settings["of"] else ""
    return f"_k{settings['k']}{subset}"


def _measure(model: Any, x: Any, _facts: Facts, settings: Settings) -> Rate:
    """Decoder passes per second of the estimate itself: its large decoder batches and log-sum-exp
    run slower per image than a plain forward pass."""
    import time

    import torch

    from vaelab.evaluation.estimators import importance_weighted_nll

    k = min(settings["k"], 256)
    n = max(1, min(len(x), _TIMED_ROWS // k))
    generator = torch.Generator(device=x.device).manual_seed(0)
    importance_weighted_nll(model, x[:n], model.likelihood, k, generator)  # warm-up
    started = time.perf_counter()
    importance_weighted_nll(model, x[:n], model.likelihood, k, generator)
    return Rate(n * k / (time.perf_counter() - started))


EVALUATOR = Evaluator(
    name="iwae",
    metrics=(
        Metric("test/nll_iw", "test NLL, IWAE", "nats", "min", by_settings=True),
        Metric("test/nll_iw_se", "test NLL s.e. over images", "nats", by_settings=True),
        Metric("test/bits_per_dim", "test bits/dim", better="min", by_settings=True),
    ),
    settings=_settings,
    passes=lambda settings: settings["k"] * settings["images"],
    per_image=lambda settings: settings["k"],
    compute=_compute,
    plan=_plan,
    turned_off=_turned_off,
    words=lambda settings: f"k={settings['k']}, {settings['images']} of {settings['of']} images",
    suffix=_suffix,
    suffix_shape="_k<k>",
    title="test NLL (IWAE, Burda et al. 2016)",
    measure=_measure,
)
