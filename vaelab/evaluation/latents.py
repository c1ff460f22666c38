"""The `latents` evaluator: how many latent dimensions the code uses, as active units (Burda et al.
2016, section 5.2: Cov_x(E_q[z_u]) > 0.01), and the KL of each dimension averaged over the test split."""

from __future__ import annotations

from vaelab.evaluation.record import EvalContext, Evaluator, Facts, Metric, Progress, Settings
from vaelab.registry import kl_by_dimension

# The test split is encoded twice: once for the means, once for each dimension's KL.
PASSES_PER_IMAGE = 2


def _compute(ctx: EvalContext, _settings: Settings, progress: Progress) -> dict[str, float]:
    from vaelab.evaluation.estimators import active_units, latent_means, mean_kl_per_dimension

    test, batch = ctx.data.test, ctx.run.eval.batch_size
    means = latent_means(ctx.model, test.x, batch, test.y)
    metrics = {"test/active_units": float(active_units(means))}
    per_dim = mean_kl_per_dimension(ctx.model, test.x, batch, test.y)
    if per_dim is not None:  # None: the model's KL does not split by dimension (VampPrior, two levels)
        metrics.update({f"test/kl_dim/{d}": float(v) for d, v in enumerate(per_dim.tolist())})
    progress(len(test))
    return metrics


def _settings(facts: Facts) -> Settings:
    return {"images": facts.test_images}


EVALUATOR = Evaluator(
    name="latents",
    metrics=(
        Metric("test/active_units", "active units", better="max"),
        Metric("test/kl_dim/", "test KL of dimension", "nats", in_table=False),  # a figure's, not a table's
    ),
    settings=_settings,
    passes=lambda settings: PASSES_PER_IMAGE * settings["images"],
    per_image=lambda settings: PASSES_PER_IMAGE,
    holds=lambda facts, settings: ("encode", min(facts.run.eval.batch_size, max(1, settings["images"]))),
    compute=_compute,
    plan=lambda run: "test/active_units, test/kl_dim/<d> on every test image" + (
        "" if kl_by_dimension(run.model) else
        " (no kl_dim: this model's KL does not split by dimension)"),
)
