"""An evaluator as one record: the metrics it logs, when it applies, its settings, its
cost in image passes, its progress and its line in the plan. The stage, the plan, the
cost, the report and the CLI loop over these records (vaelab.evaluation.evaluators holds
them in run order) and never name an evaluator. Imports no torch: the plan of a
`--dry-run` reads the records."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from vaelab.data import ImageData
    from vaelab.models import VAE
    from vaelab.spec import RunSpec

# A training step costs about three forward passes (forward, and backward at twice that): what
# "no more passes than training took" counts a training image as.
PASSES_PER_TRAINING_IMAGE = 3

Settings = dict[str, Any]
Progress = Callable[[int], None]  # told of each batch of images done


@dataclass(frozen=True)
class Facts:
    """What settings and costs depend on, known before any image is read: the run, its splits'
    sizes, the epochs it trained (planned ones for a cost) and whether its likelihood is a
    probability mass. The run's own evaluation takes them from its data and model; `--dry-run`
    from the spec (vaelab.cost)."""

    run: RunSpec
    train_images: int
    test_images: int
    epochs_run: int
    discrete: bool
    spent: int = 0  # image passes the rest of the evaluation takes (the figures, the other evaluators)

    @property
    def seed(self) -> int:
        return self.run.train.seed + 1  # the test evaluation's noise (train.seed orders batches, + 2 is validation)

    def training_passes(self, epochs: int) -> int:
        """Image passes `epochs` of training cost."""
        return PASSES_PER_TRAINING_IMAGE * epochs * self.train_images

    def allowance(self, epochs: int) -> int:
        """Image passes left to an evaluator capped by training's cost: those `epochs` of training took,
        less what the rest of the evaluation takes, so that the evaluation as a whole costs no more."""
        return max(0, self.training_passes(epochs) - self.spent)


@dataclass
class EvalContext:
    """What evaluators read: the trained model, its data, its run and how long it trained."""

    model: VAE
    data: ImageData
    run: RunSpec
    epochs_run: int
    reserved: int = 0  # image passes the caller spends beside the evaluators (a run's figures)

    @property
    def seed(self) -> int:
        return self.facts.seed

    @property
    def facts(self) -> Facts:
        return Facts(self.run, len(self.data.train), len(self.data.test), self.epochs_run,
                     bool(self.model.likelihood.discrete), self.reserved)

    def generator(self) -> torch.Generator:
        import torch

        return torch.Generator(device=self.data.test.x.device).manual_seed(self.seed)


@dataclass(frozen=True)
class Metric:
    """One number an evaluator logs. `key` ending in "/" is a family (`test/kl_dim/` + a latent
    dimension). `better`: "min", "max" or None (a part or a spread, never ranked). `by_settings`:
    its value depends on the evaluator's settings, so a later evaluation with other settings logs
    it as key + the evaluator's suffix. `in_table`: the report's tables show it (side numbers
    and families stay in MLflow)."""

    key: str
    label: str
    unit: str = ""
    better: str | None = None
    by_settings: bool = False
    in_table: bool = True

    @property
    def header(self) -> str:
        """The report's column header: the label with its unit."""
        return f"{self.label} ({self.unit})" if self.unit else self.label

    @property
    def family(self) -> bool:
        return self.key.endswith("/")

    @property
    def shown(self) -> str:
        """The key as help and plans write it (`test/kl_dim/<d>` for a family)."""
        return f"{self.key}<d>" if self.family else self.key


@dataclass(frozen=True)
class Rate:
    """A measured cost: passes per second, and seconds that do not grow with the passes (a solver's start)."""

    passes_per_s: float
    fixed_s: float = 0.0

    def seconds(self, passes: int) -> float:
        return passes / self.passes_per_s + self.fixed_s


@dataclass(frozen=True)
class Section:
    """A report section of its own for an evaluator's metrics: its heading and what to read first."""

    heading: str
    text: str


def _applies(_run: RunSpec) -> str | None:
    return None


def _fits(_ctx: EvalContext) -> str | None:
    return None


def _one(_settings: Settings) -> int:
    return 1


def _unmarked(_settings: Settings) -> str:
    return ""


def _accepts(_settings: Settings) -> str | None:
    return None


def _batch(facts: Facts, _settings: Settings) -> tuple[str, int]:
    return "forward", min(facts.run.eval.batch_size, max(1, facts.test_images))


@dataclass(frozen=True)
class Evaluator:
    """One family of test metrics.

    - `metrics`: what it logs (the report's headers and the CLI's help come from these).
    - `turned_off(run)`: why the spec turns it off (before data or a model exist; the plan and the
      cost read it), or None; `unfit(ctx)`: why the run's data or model cannot support it, or None.
    - `settings(facts)`: its estimator settings, logged with its metrics (tag vaelab.eval.<name>).
    - `passes(settings)`: image passes through the encoder (and decoder): its progress bar's total,
      and with a measured rate its cost. `per_image(settings)`: passes per image `compute` reports.
    - `compute(ctx, settings, progress)`: its `test/...` metrics.
    - `plan(run)`: what it will do in words, for `--dry-run` (no torch, no data).
    - `words(settings)`: its settings in words, for the progress bar and the report's marks.
    - `suffix(settings)`: what names its `by_settings` metrics in a later evaluation (test/nll_iw_k5000).
    - `measure(model, x, facts, settings)`: its Rate, measured by itself where the plain inference
      rate would mislead (its own batches, classifiers); None: the plain rate and `fixed_s`, seconds
      beyond its passes (a solver that does not scale with them). Cost = passes / rate + fixed.
    - `section`: its metrics get a report section of their own.
    - `declines(settings)`: why the settings leave nothing worth computing (a cap left too few samples),
      or None; the evaluator is then skipped with that reason.
    - `holds(facts, settings)`: the pass its chunks make ("forward", "encode" or "decode", as
      vaelab.models.footprint measures them) and the rows it would hold at once were memory no limit;
      the evaluation budget caps them. The pre-flight estimate's evaluation phase comes from these.
    """

    name: str
    metrics: tuple[Metric, ...]
    settings: Callable[[Facts], Settings]
    passes: Callable[[Settings], int]
    compute: Callable[[EvalContext, Settings, Progress], dict[str, float]]
    plan: Callable[[RunSpec], str]
    turned_off: Callable[[RunSpec], str | None] = _applies
    unfit: Callable[[EvalContext], str | None] = _fits
    per_image: Callable[[Settings], int] = _one
    words: Callable[[Settings], str] = _unmarked
    suffix: Callable[[Settings], str] = _unmarked
    suffix_shape: str = ""  # the suffix in words, for the report ("_k<k>")
    title: str = ""  # its settings' line in the report ("test NLL (IWAE, Burda et al. 2016)")
    measure: Callable[..., Rate] | None = None
    fixed_s: float = 0.0
    section: Section | None = None
    holds: Callable[[Facts, Settings], tuple[str, int]] = _batch
    declines: Callable[[Settings], str | None] = _accepts

    def skip_reason(self, ctx: EvalContext) -> str | None:
        """Why it does not run on `ctx`, or None."""
        return self.turned_off(ctx.run) or self.unfit(ctx)

    def renames(self, key: str) -> bool:
        """Whether a later evaluation names `key` by its settings."""
        return any(m.by_settings and m.key == key for m in self.metrics)

    def owns(self, key: str) -> Metric | None:
        """The metric `key` is, or is the settings-marked name of (test/nll_iw_k5000 -> test/nll_iw)."""
        for metric in self.metrics:
            if key == metric.key or (metric.family and key.startswith(metric.key)):
                return metric
        for metric in self.metrics:
            if metric.by_settings and key.startswith(metric.key + "_") and self._marked(key[len(metric.key):]):
                return metric
        return None

    def _marked(self, tail: str) -> bool:
        # A suffix starts with "_" and its first letter (k, s): test/nll_iw_se is not test/nll_iw marked.
        return bool(self.suffix_shape) and tail.startswith(self.suffix_shape[:2]) and tail[2:3].isdigit()


def settle(facts: Facts,
           chosen: list[tuple[Evaluator, str | None]]) -> list[tuple[Evaluator, Settings | None, str | None]]:
    """(evaluator, its settings or None, why it is skipped or None) for each (evaluator, reason it is
    skipped or None), in run order. Each evaluator's settings see as spent (`Facts.spent`) what the
    ones before it take, beside `facts.spent` (the figures): one capped by training's cost (iwae) then
    keeps what runs up to it within training's passes."""
    rows: list[tuple[Evaluator, Settings | None, str | None]] = []
    spent = facts.spent
    for evaluator, reason in chosen:
        if reason is not None:
            rows.append((evaluator, None, reason))
            continue
        settings = evaluator.settings(replace(facts, spent=spent))
        declined = evaluator.declines(settings)
        rows.append((evaluator, None if declined else settings, declined))
        spent += 0 if declined else evaluator.passes(settings)
    return rows
