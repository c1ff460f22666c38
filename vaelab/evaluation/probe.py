"""The `probe` evaluator: how linearly the classes can be read off the code, as the test accuracy
of a logistic regression fitted on standardised latent means of (up to 10,000) training images."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vaelab.evaluation.record import EvalContext, Evaluator, Facts, Metric, Progress, Settings

if TYPE_CHECKING:
    from vaelab.spec import RunSpec

PROBE_TRAIN_IMAGES = 10_000
PROBE_MIN_IMAGES = 20
SOLVER_S = 2.0  # the logistic regression's fit, about the same for any size up to PROBE_TRAIN_IMAGES


# The encoder of a conditional VAE is given the label, so a probe reading the label off its code measures the
# input, not the code (it scores 1.0): nothing to report.
CONDITIONAL = "model.conditional: the encoder is given the label, so a probe of its code measures nothing"


def _turned_off(run: RunSpec) -> str | None:
    if not run.eval.probe:
        return "eval.probe is false"
    return CONDITIONAL if run.model.conditional else None


def _unfit(ctx: EvalContext) -> str | None:
    import torch

    train, test = ctx.data.train, ctx.data.test
    if ctx.model.num_classes:  # a conditional model loaded from a checkpoint
        return CONDITIONAL
    if len(train) < PROBE_MIN_IMAGES:
        return f"{len(train)} training images (the probe needs {PROBE_MIN_IMAGES})"
    if len(torch.unique(train.y[:PROBE_TRAIN_IMAGES])) < 2 or len(torch.unique(test.y)) < 2:
        return "the data has fewer than 2 classes (no labels to probe)"
    return None


def _settings(facts: Facts) -> Settings:
    return {"train_images": min(PROBE_TRAIN_IMAGES, facts.train_images), "test_images": facts.test_images,
            "classifier": "logistic regression on standardised latent means"}


def _compute(ctx: EvalContext, settings: Settings, progress: Progress) -> dict[str, float]:
    from vaelab.evaluation.estimators import latent_means, probe_accuracy

    train, test, batch = ctx.data.train, ctx.data.test, ctx.run.eval.batch_size
    n = settings["train_images"]
    train_means = latent_means(ctx.model, train.x.first(n), batch, train.y[:n])
    test_means = latent_means(ctx.model, test.x, batch, test.y)
    progress(n + len(test))
    return {"test/probe_acc": probe_accuracy(train_means, train.y[:n], test_means, test.y)}


EVALUATOR = Evaluator(
    name="probe",
    metrics=(Metric("test/probe_acc", "probe accuracy", better="max"),),
    settings=_settings,
    passes=lambda settings: settings["train_images"] + settings["test_images"],
    compute=_compute,
    plan=lambda run: "test/probe_acc: logistic regression on latent means (skipped when the data has no labels)",
    turned_off=_turned_off,
    unfit=_unfit,
    fixed_s=SOLVER_S,
)
