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
reference numbers never mix.

Draws: each metric family samples its own factors (vaelab.disentanglement.metrics.metric_rng: a numpy
SeedSequence per family from one seed), so no family's codes are another's, and that seed comes from the
run's identity as trained (`draw_seed`: its vaelab.run_hash with eval.* at their defaults, which covers
train.seed), so runs of one study are scored on draws of their own (their spread over seeds includes the
draws' error) and the same run evaluated again gets the same numbers. Both are in the settings.

Standard errors: test/dis/<score>_se beside each headline score, from the samples the metrics already
drew and encoded (no image passes, so the cap above is untouched; their seconds are in `_measure`'s
fixed cost): a bootstrap over the evaluation points with the fitted classifiers held fixed, or over the
codes for MIG and modularity (the whole estimate redone), and for DCI's disentanglement and completeness,
which only refits can vary, the spread over SE_PARTS disjoint parts of its training codes. Each metric's
`se_method` setting says which."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace
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

# The MIG `vaelab.disentanglement.metrics.mig` computes (its num_bins default is metrics.NUM_BINS), in words for
# the report: studies differ in each part of it.
MIG_VARIANT = ("disentanglement_lib's discrete MIG: posterior means, each latent in 20 equal-width histogram bins "
               "over its observed range, plug-in mutual information with each factor, the gap between the two most "
               "informative latents over the factor's entropy H(v_k), averaged over factors")
# The smallest share "auto" gives (about 100 points for MIG and each classifier): below it the scores
# say little. Like the IWAE subset's 100 images, it may cost more than a very short training.
MIN_SHARE = 0.01
# The share `--dry-run` times the whole evaluation at (rendering, encoding, the classifiers), on the
# untrained model: about 6,000 images.
MEASURE_SHARE = 0.002
_SIZES = ("num_train", "num_eval", "num_test", "num_variance_estimate")
_SMALLEST = 10  # no sample size below this, whatever the share
_PASSED = (*_SIZES, "importance", "se_resamples", "se_parts")  # the settings a metric is called with

# (metric function in vaelab.disentanglement.metrics, its output) -> test/dis/<name>; the headline of
# each family is in the report's tables, its side numbers stay in MLflow.
_NAMED: tuple[tuple[str, str, str, str, bool], ...] = (
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
)
# Each headline score's standard error (the metric's output + "_se"), a side number kept in MLflow.
_SCORES: tuple[tuple[str, str, Metric], ...] = tuple(
    (family, output, Metric(f"test/dis/{name}", label, better="max" if table else None, by_settings=True,
                            in_table=table))
    for family, output, name, label, table in _NAMED) + tuple(
    (family, f"{output}_se", Metric(f"test/dis/{name}_se", f"{label} s.e.", by_settings=True, in_table=False))
    for family, output, name, label, table in _NAMED if table)


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


def draw_seed(run: RunSpec) -> int:
    """The seed of a run's factor draws: its identity as trained, `RunSpec.hash` (the vaelab.run_hash tag's
    value, which covers train.seed) with eval.* at their defaults, as an integer. Runs that differ in anything
    they trained with draw differently; the same run draws the same, in its own evaluation and in every
    later `vaelab evaluate` (whose eval.* differ)."""
    return int(replace(run, eval=type(run.eval)()).hash(), 16)


_SEED_FROM = ("the run's identity: its vaelab.run_hash computed with eval.* at their defaults (covers train.seed), "
              "as an integer")
_STREAMS = ("one numpy SeedSequence(seed, spawn_key=(crc32 of the metric's name,)) per metric family "
            "(vaelab.disentanglement.metrics.metric_rng): no family sees another's draws")


def _sized(share: float, seed: int, importance: str) -> Settings:
    from vaelab.disentanglement.metrics import METRICS, metric_settings

    out = {}
    for name in METRICS:
        defaults = metric_settings(name)
        scaled: dict[str, Any] = {k: max(_SMALLEST, int(round(defaults[k] * share))) for k in _SIZES if k in defaults}
        if name == "dci":
            scaled["importance"] = importance
        out[name] = metric_settings(name, **scaled)
    return {"seed": seed, "seed_from": _SEED_FROM, "streams": _STREAMS, "codes": "posterior means",
            "share_of_reference_sizes": share, "metrics": out}


def _settings(facts: Facts) -> Settings:
    settings = _sized(sample_share(facts.run, facts.train_images), draw_seed(facts.run), facts.run.eval.dci_importance)
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

    from sklearn.exceptions import ConvergenceWarning

    from vaelab.disentanglement.metrics import METRICS, metric_rng

    metrics: dict[str, float] = {}
    with warnings.catch_warnings():
        # The reference's classifiers stop at scikit-learn's default iterations (their settings say
        # so); a warning per classifier would bury the progress bars.
        warnings.simplefilter("ignore", ConvergenceWarning)
        for name, fn in METRICS.items():
            params = {k: v for k, v in settings["metrics"][name].items() if k in _PASSED}
            out = fn(factors, encode, metric_rng(settings["seed"], name), **params)
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

    small = _sized(MEASURE_SHARE, draw_seed(facts.run), facts.run.eval.dci_importance)
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
    what = ("test/dis/* (BetaVAE, FactorVAE, MIG, SAP, DCI, modularity; each with its _se) on factors drawn from "
            "the whole grid, each family its own draw")
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
        f"modularity and explicitness (Ridgeway & Mozer 2018). **MIG here is {MIG_VARIANT}**; implementations "
        "in the field differ in each of these and give numbers orders of magnitude apart on the same model. "
        "Each metric samples factors of its own, from a seed each run's identity gives, so the ± over seeds "
        "includes the draws' error; each run's standard error of each score is logged beside it as "
        "`test/dis/<score>_se` (a bootstrap over the metric's own samples, or for DCI disentanglement and "
        "completeness the spread over parts of its training draw: the tag's `se_method` says which).")),
)
