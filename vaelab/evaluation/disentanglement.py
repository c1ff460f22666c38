"""The `disentanglement` evaluator: BetaVAE, FactorVAE, MIG, SAP, DCI and modularity /
explicitness scores against the ground-truth factors (vaelab.disentanglement.metrics), on
data that has them (dSprites), as test/dis/<score>.

Sample sizes: a share of disentanglement_lib's reference sizes (eval.dis_samples). The
default, auto, follows the rule the IWAE subset follows: the scores cost no more image passes
than training does (3 per training image per epoch, over train.epochs: the planned epochs, so
that every run of a study, stopped early or not, is scored at the same sizes), at least
MIN_SHARE of the reference. 1 is the reference sizes, on demand (`vaelab evaluate`, or a spec
that sets it, as disentanglement_study does). The share is recorded with the scores (tag
vaelab.eval.disentanglement; a later evaluation's names end in _s<share>), so capped and
reference numbers never mix."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vaelab.evaluation.record import (
    PASSES_PER_TRAINING_IMAGE,
    EvalContext,
    Evaluator,
    Facts,
    Metric,
    Progress,
    Rate,
    Section,
    Settings,
)
from vaelab.registry import DATASETS, train_size

if TYPE_CHECKING:
    from vaelab.spec import RunSpec

# The smallest share "auto" gives (about 100 points for MIG and each classifier): below it the scores
# say little. Like the IWAE subset's 100 images, it may cost more than a very short training.
MIN_SHARE = 0.01
# The share `--dry-run` times the whole evaluation at (rendering, encoding, the classifiers), on the
# untrained model: about 6,000 images.
MEASURE_SHARE = 0.002
_SIZES = ("num_train", "num_eval", "num_test", "num_variance_estimate")
_SMALLEST = 10  # no sample size below this, whatever the share

# (metric function in vaelab.disentanglement.metrics, its output) -> test/dis/<name>; the headline of
# each family is in the report's tables, its side numbers stay in MLflow.
_SCORES: tuple[tuple[str, str, Metric], ...] = tuple(
    (family, output, Metric(f"test/dis/{name}", label, better="max" if table else None, by_settings=True,
                            in_table=table))
    for family, output, name, label, table in (
        ("beta_vae", "eval_accuracy", "beta_vae", "BetaVAE score", True),
        ("beta_vae", "train_accuracy", "beta_vae_train", "BetaVAE score on its training points", False),
        ("factor_vae", "eval_accuracy", "factor_vae", "FactorVAE score", True),
        ("factor_vae", "train_accuracy", "factor_vae_train", "FactorVAE score on its training votes", False),
        ("factor_vae", "num_active_dims", "factor_vae_active_dims", "FactorVAE score's active latents", False),
        ("mig", "discrete_mig", "mig", "MIG", True),
        ("sap", "sap_score", "sap", "SAP", True),
        ("dci", "disentanglement", "dci_disentanglement", "DCI disentanglement", True),
        ("dci", "completeness", "dci_completeness", "DCI completeness", True),
        ("dci", "informativeness_test", "dci_informativeness", "DCI informativeness", True),
        ("dci", "informativeness_train", "dci_informativeness_train", "DCI informativeness on training codes",
         False),
        ("modularity_explicitness", "modularity_score", "modularity", "modularity", True),
        ("modularity_explicitness", "explicitness_score_test", "explicitness", "explicitness", True),
        ("modularity_explicitness", "explicitness_score_train", "explicitness_train", "explicitness on training codes",
         False),
    ))


def reference_passes() -> int:
    """Images all the scores encode at disentanglement_lib's sizes (about 2.9 million)."""
    from vaelab.disentanglement.metrics import METRICS, metric_settings

    return sum(int(metric_settings(name)["images_encoded"]) for name in METRICS)


def training_passes(run: RunSpec, train_images: int) -> int:
    """What "no more than training" allows: the image passes of train.epochs over the training split."""
    return PASSES_PER_TRAINING_IMAGE * run.train.epochs * train_images


def sample_share(run: RunSpec, train_images: int) -> float:
    """The share of the reference sample sizes the run's scores use: eval.dis_samples, or for auto
    the training-cost cap, rounded down to two significant digits, at least MIN_SHARE."""
    asked = run.eval.dis_samples
    if asked != "auto":
        return float(asked)
    share = training_passes(run, train_images) / reference_passes()
    if share >= 1:
        return 1.0
    digits = 1 - math.floor(math.log10(share))
    return max(MIN_SHARE, round(math.floor(share * 10**digits + 1e-9) / 10**digits, digits))


def _sized(share: float, seed: int, importance: str) -> Settings:
    from vaelab.disentanglement.metrics import METRICS, metric_settings

    out = {}
    for name in METRICS:
        defaults = metric_settings(name)
        scaled: dict[str, Any] = {k: max(_SMALLEST, int(round(defaults[k] * share))) for k in _SIZES if k in defaults}
        if name == "dci":
            scaled["importance"] = importance
        out[name] = metric_settings(name, **scaled)
    return {"seed": seed, "share_of_reference_sizes": share, "metrics": out}


def _settings(facts: Facts) -> Settings:
    settings = _sized(sample_share(facts.run, facts.train_images), facts.seed, facts.run.eval.dci_importance)
    if facts.run.eval.dis_samples == "auto":
        settings["capped_by_training_passes"] = training_passes(facts.run, facts.train_images)
    return settings


def _passes(settings: Settings) -> int:
    return sum(int(m["images_encoded"]) for m in settings["metrics"].values())


def _no_factors() -> str:
    with_factors = ", ".join(name for name, d in DATASETS.items() if d.factors)
    return f"the data has no ground-truth factors (data.dataset: {with_factors} has)"


_CONDITIONAL = "a conditional model's code depends on its label"


def _turned_off(run: RunSpec) -> str | None:
    if run.eval.disentanglement is False:
        return "eval.disentanglement is false"
    if not DATASETS[run.data.dataset].factors:
        return _no_factors()
    if run.model.conditional:
        return _CONDITIONAL
    return None


def _unfit(ctx: EvalContext) -> str | None:
    if ctx.data.factors is None:
        return _no_factors()
    return _CONDITIONAL if ctx.model.num_classes else None


def encoder(model: Any, device: Any, progress: Progress) -> Callable[[Any], Any]:
    """Observations -> `model`'s posterior means as float64 numpy (the code the metrics score), on `device`;
    encoded as many at a time as the model's evaluation budget holds (vaelab.models.footprint)."""
    import torch

    from vaelab.models.footprint import in_chunks, rows

    model.eval()

    def encode(observations: Any) -> Any:
        with torch.inference_mode():
            x = torch.as_tensor(observations, dtype=torch.float32, device=device)
            codes = in_chunks(lambda a, b: model.encode(x[a:b])[0], len(x), rows(model, "encode", len(x)))
            means = codes.double().cpu().numpy()
        progress(len(x))
        return means

    return encode


def scores(encode: Callable[[Any], Any], factors: Any, settings: Settings) -> dict[str, float]:
    """Every score of the code `encode` gives, on `factors`, with `settings`."""
    import warnings

    import numpy as np
    from sklearn.exceptions import ConvergenceWarning

    from vaelab.disentanglement.metrics import METRICS

    metrics: dict[str, float] = {}
    with warnings.catch_warnings():
        # The reference's classifiers stop at scikit-learn's default iterations (their settings say
        # so); a warning per classifier would bury the progress bars.
        warnings.simplefilter("ignore", ConvergenceWarning)
        for name, fn in METRICS.items():
            params = {k: v for k, v in settings["metrics"][name].items() if k in (*_SIZES, "importance")}
            out = fn(factors, encode, np.random.default_rng(settings["seed"]), **params)
            metrics.update({metric.key: float(out[output]) for family, output, metric in _SCORES
                            if family == name and output in out})
    return metrics


def _compute(ctx: EvalContext, settings: Settings, progress: Progress) -> dict[str, float]:
    factors = ctx.data.factors
    # Rendering on demand costs more than rendering the grid once when the metrics ask for more images
    # than the grid has (disentanglement_lib's sizes: about 2.9 million for dSprites' 737,280).
    if _passes(settings) > getattr(factors, "num_images", math.inf) and hasattr(factors, "use_grid_cache"):
        factors.use_grid_cache(ctx.run.data.cache_dir, show_progress=True)
    return scores(encoder(ctx.model, ctx.data.test.x.device, progress), factors, settings)


class _TimedFactors:
    """A factor source whose rendering adds to `clock[0]` (seconds): rendering grows with the passes."""

    def __init__(self, source: Any, clock: list[float]) -> None:
        self.source, self.clock = source, clock
        self.factor_sizes, self.factor_names = source.factor_sizes, source.factor_names

    def sample_factors(self, n: int, rng: Any) -> Any:
        return self.source.sample_factors(n, rng)

    def images(self, factors: Any) -> Any:
        started = time.perf_counter()
        try:
            return self.source.images(factors)
        finally:
            self.clock[0] += time.perf_counter() - started


def _measure(model: Any, x: Any, facts: Facts, _settings: Settings) -> Rate:
    """The whole evaluation (sampling and rendering factors, encoding, fitting the classifiers) timed
    at MEASURE_SHARE on `model` over dSprites' renderer (no file needed): rendering and encoding grow
    with the passes; the classifiers' fits on so few points are mostly their fixed start-up, kept as
    fixed seconds. An untrained model's FactorVAE score stops early (no active latent)."""
    from vaelab.data.dsprites import DSprites

    small = _sized(MEASURE_SHARE, facts.seed, facts.run.eval.dci_importance)
    clock = [0.0]  # seconds spent rendering and encoding
    encode = encoder(model, x.device, lambda n: None)

    def timed(observations: Any) -> Any:
        started = time.perf_counter()
        try:
            return encode(observations)
        finally:
            clock[0] += time.perf_counter() - started

    started = time.perf_counter()
    scores(timed, _TimedFactors(DSprites(), clock), small)
    total = time.perf_counter() - started
    return Rate(_passes(small) / max(clock[0], 1e-9), max(0.0, total - clock[0]))


def _holds(_facts: Facts, _settings: Settings) -> tuple[str, int]:
    from vaelab.disentanglement.metrics import ENCODE_CHUNK  # the observations rendered and encoded at a time

    return "encode", ENCODE_CHUNK


def _plan(run: RunSpec) -> str:
    what = "test/dis/* (BetaVAE, FactorVAE, MIG, SAP, DCI, modularity) on factors drawn from the whole grid"
    if run.eval.dis_samples != "auto":
        return f"{what}, at {float(run.eval.dis_samples):g} of disentanglement_lib's sample sizes"
    return (f"{what}, at disentanglement_lib's sample sizes scaled to cost no more than training's "
            f"{training_passes(run, train_size(run.data)):,} image passes (eval.dis_samples: auto; at least "
            f"{MIN_SHARE:g} of them; 1 on demand)")


EVALUATOR = Evaluator(
    name="disentanglement",
    metrics=tuple(metric for _, _, metric in _SCORES),
    settings=_settings,
    passes=_passes,
    compute=_compute,
    plan=_plan,
    turned_off=_turned_off,
    unfit=_unfit,
    words=lambda settings: f"{settings['share_of_reference_sizes']:g} of disentanglement_lib's sample sizes",
    suffix=lambda settings: f"_s{settings['share_of_reference_sizes']:g}",
    suffix_shape="_s<share>",
    title="disentanglement scores (test/dis/*)",
    measure=_measure,
    holds=_holds,
    section=Section("Disentanglement", (
        "Scores against the ground-truth factors (higher is better, 0–1), at the sample sizes each run's "
        "`vaelab.eval.disentanglement` tag records: BetaVAE (Higgins et al. 2017), FactorVAE (Kim & Mnih "
        "2018), MIG (Chen et al. 2018), SAP (Kumar et al. 2018), DCI (Eastwood & Williams 2018), "
        "modularity and explicitness (Ridgeway & Mozer 2018).")),
)
