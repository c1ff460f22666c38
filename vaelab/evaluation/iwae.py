"""The `iwae` evaluator: -log p(x) by importance weighting (Burda et al. 2016, eq. 8) with
eval.iw_samples samples per image, its standard error over images, and bits per dimension.
By default on a seeded subset of the test split that costs no more passes than training did:
fewer images, down to IW_MIN_IMAGES, then fewer samples per image (said in its settings, its words
and its plan line), down to IW_MIN_K, below which it is skipped with the reason. What training's
passes allow is shared: the figures and the evaluators before it (elbo, latents) take theirs first
(record.settle), so that the default evaluation up to it costs no more than training did."""

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
# The cap lowers k no further: with k = 1 the estimate is a one-sample ELBO (Burda et al. 2016, eq. 8),
# which test/elbo reports already over every test image; a number named an NLL would add nothing, so
# the evaluator is skipped with the reason instead.
IW_MIN_K = 2


def iw_images(facts: Facts) -> int:
    """How many test images the estimate uses: eval.iw_images (null: all), capped by
    eval.iw_capped so that it costs no more passes than training left (Facts.allowance), at least
    IW_MIN_IMAGES."""
    spec, n_test = facts.run.eval, facts.test_images
    n = min(n_test, spec.iw_images or n_test)
    if spec.iw_capped and spec.iw_samples:
        n = min(n, max(IW_MIN_IMAGES, facts.allowance(facts.epochs_run) // spec.iw_samples))
    return max(1, n)


def iw_samples(facts: Facts) -> int:
    """Samples per image: eval.iw_samples, or, capped, where the images cannot go lower (IW_MIN_IMAGES, or
    the whole test split), as many as keep the estimate within what training's passes leave."""
    spec, k = facts.run.eval, facts.run.eval.iw_samples
    if not (spec.iw_capped and k):
        return k
    return max(1, min(k, facts.allowance(facts.epochs_run) // iw_images(facts)))


def _declines(settings: Settings) -> str | None:
    if "k_asked" in settings and settings["k"] < IW_MIN_K:
        return (f"{settings['images']} test images x k={settings['k_asked']} cost more than the "
                f"{settings['passes_left']:,} image passes training's cost leaves the estimate, and k="
                f"{settings['k']} would be below {IW_MIN_K} (eval.iw_capped=false runs it as asked)")
    return None


def iw_subset(n_test: int, n: int) -> torch.Tensor:
    """The same n test images for every run: a seeded choice, in test order."""
    import torch

    if n >= n_test:
        return torch.arange(n_test)
    return torch.randperm(n_test, generator=torch.Generator().manual_seed(IW_SUBSET_SEED))[:n].sort().values


def _turned_off(run: RunSpec) -> str | None:
    return "eval.iw_samples is 0" if run.eval.iw_samples == 0 else None


def _settings(facts: Facts) -> Settings:
    n, k, asked = iw_images(facts), iw_samples(facts), facts.run.eval.iw_samples
    settings = {"k": k, "images": n, "of": facts.test_images,
                "subset_seed": IW_SUBSET_SEED if n < facts.test_images else None, "seed": facts.seed,
                "bits": "probability mass" if facts.discrete else "probability of each 8-bit bin"}
    if k < asked:  # lowered by the training-cost cap
        settings.update(k_asked=asked, passes_left=facts.allowance(facts.epochs_run))
    return settings


def _words(settings: Settings) -> str:
    lowered = (f" (lowered from {settings['k_asked']}: no more passes than training)" if "k_asked" in settings
               else "")
    return f"k={settings['k']}{lowered}, {settings['images']} of {settings['of']} images"


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
    cap = (f", no more passes than training took, less the figures' and those of the evaluators before it (at "
           f"least {IW_MIN_IMAGES} images; then fewer samples each, skipped below k={IW_MIN_K})") if e.iw_capped else ""
    return f"test/nll_iw (+ _se, bits_per_dim): k={e.iw_samples} on {images} test images{cap}"


def _suffix(settings: Settings) -> str:
    subset = f"_n{settings['images']}" if settings["images"] < settings["of"] else ""
    return f"_k{settings['k']}{subset}"


def _measure(model: Any, x: Any, _facts: Facts, settings: Settings) -> Rate:
    """Decoder passes per second of the estimate itself: its large decoder batches and log-sum-exp
    run slower per image than a plain forward pass. Timed on one chunk of decoder rows, the most the
    model's evaluation budget holds at once (vaelab.models.footprint)."""
    import time

    import torch

    from vaelab.evaluation.estimators import DRAW_ROWS, importance_weighted_nll
    from vaelab.models.footprint import rows

    k = max(1, min(settings["k"], 256))
    n = max(1, min(len(x), rows(model, "decode", DRAW_ROWS) // k))
    generator = torch.Generator(device=x.device).manual_seed(0)
    importance_weighted_nll(model, x[:1], model.likelihood, 1, generator)  # warm-up
    started = time.perf_counter()
    importance_weighted_nll(model, x[:n], model.likelihood, k, generator)
    return Rate(n * k / (time.perf_counter() - started))


def _holds(_facts: Facts, settings: Settings) -> tuple[str, int]:
    from vaelab.evaluation.estimators import DRAW_ROWS

    return "decode", max(1, min(DRAW_ROWS, settings["k"] * settings["images"]))


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
    declines=_declines,
    holds=_holds,
    words=_words,
    suffix=_suffix,
    suffix_shape="_k<k>",
    title="test NLL (IWAE, Burda et al. 2016)",
    measure=_measure,
)
