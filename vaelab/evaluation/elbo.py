"""The `elbo` evaluator: the negative ELBO and its parts over the whole test split, one posterior
sample per image (Kingma & Welling 2014), in nats per image; mse per pixel against the decoder mean."""

from __future__ import annotations

from vaelab.evaluation.record import EvalContext, Evaluator, Facts, Metric, Progress, Settings


def _settings(facts: Facts) -> Settings:
    return {"images": facts.test_images, "samples": 1, "seed": facts.seed}


def _compute(ctx: EvalContext, _settings: Settings, progress: Progress) -> dict[str, float]:
    from vaelab.evaluation.estimators import split_terms
    from vaelab.objectives import kl_weighting

    terms = split_terms(ctx.model, ctx.data.test, ctx.model.likelihood, kl_weighting(ctx.run),
                        ctx.run.eval.batch_size, ctx.generator())
    progress(len(ctx.data.test))
    return {f"test/{k}": v for k, v in terms.items()}


EVALUATOR = Evaluator(
    name="elbo",
    metrics=(
        Metric("test/elbo", "test −ELBO", "nats", "min"),
        Metric("test/recon", "test recon", "nats", "min"),
        Metric("test/kl", "test KL", "nats"),
        Metric("test/mse", "test MSE", "per pixel", "min"),
        # The training loss weighs the KL by the run's own beta: configurations differ in it by construction.
        Metric("test/loss", "test loss", "nats", in_table=False),
    ),
    settings=_settings,
    passes=lambda settings: settings["images"],
    compute=_compute,
    plan=lambda run: "test/elbo, recon, kl, loss, mse on every test image (1 posterior sample)",
)
