"""Evaluation as a stage: the chosen evaluators run one after another, each with a
progress bar (rate and ETA) and its seconds logged as time/eval/<name>_s; one that
does not apply to the data is skipped with a note instead of failing the run; each
metric family's estimator settings go with it as a tag (vaelab.eval.<name>). A value that is
not finite (NaN, inf) is not logged: one warning line says so, and vaelab.eval.not_finite keeps it."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

from vaelab import progress
from vaelab.errors import UserInputError
from vaelab.evaluation.evaluators import EVALUATORS
from vaelab.evaluation.record import EvalContext, Evaluator, settle

SKIPPED_TAG = "vaelab.eval.skipped"
NOT_FINITE_TAG = "vaelab.eval.not_finite"  # "<metric> = nan (<evaluator>)": computed but not logged
NOTES_SHOWN = 8  # non-finite metrics named in the tag and the warning (a NaN model's kl_dim/* are many)


@dataclass
class Evaluation:
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)  # vaelab.eval.<name>: its settings; the skipped ones
    skipped: list[str] = field(default_factory=list)  # "<evaluator>: <why it did not run>"
    ran: list[str] = field(default_factory=list)
    not_finite: list[str] = field(default_factory=list)  # "<metric> = nan (<evaluator>)"

    @property
    def seconds(self) -> float:
        return sum(v for k, v in self.metrics.items() if k.startswith("time/eval/"))


def select(names: list[str] | None) -> list[Evaluator]:
    """The evaluators named (all, in their fixed order, when None); an unknown name is a UserInputError."""
    if names is None:
        return list(EVALUATORS.values())
    unknown = [n for n in names if n not in EVALUATORS]
    if unknown:
        raise UserInputError(f"--metrics: unknown evaluator {unknown[0]!r}; known: {', '.join(EVALUATORS)}")
    return [EVALUATORS[n] for n in EVALUATORS if n in names]


def settings_text(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


def plan(ctx: EvalContext, evaluators: list[Evaluator]) -> list[tuple[Evaluator, dict | None, str | None]]:
    """(evaluator, its settings or None, why it is skipped or None) for each evaluator; an evaluator
    capped by training's cost leaves room for the others and the figures (`record.settle`)."""
    return settle(ctx.facts, [(evaluator, evaluator.skip_reason(ctx)) for evaluator in evaluators])


def evaluate(ctx: EvalContext, evaluators: list[Evaluator] | None = None, show_progress: bool = True,
             marked: bool = False, done_tags: dict[str, str] | None = None) -> Evaluation:
    """Run `evaluators` (default all) on `ctx`. `marked`: name settings-dependent metrics
    by their settings (a later evaluation of a finished run); `done_tags`: the run's
    tags, so an evaluation with the same settings as one it has is not repeated."""
    out = Evaluation()
    chosen = list(EVALUATORS.values()) if evaluators is None else evaluators
    for evaluator, settings, reason in plan(ctx, chosen):
        if reason is not None or settings is None:
            out.skipped.append(f"{evaluator.name}: {reason}")
            continue
        suffix = evaluator.suffix(settings) if marked else ""
        tag, text = f"vaelab.eval.{evaluator.name}{suffix}", settings_text(settings)
        own = f"vaelab.eval.{evaluator.name}"  # the run's own evaluation may have used these very settings
        if done_tags is not None and text in (done_tags.get(tag), done_tags.get(own)):
            out.skipped.append(f"{evaluator.name}: already evaluated with these settings")
            continue
        out.metrics.update(_finite(_run_one(ctx, evaluator, settings, suffix, show_progress), evaluator.name,
                                   out.not_finite))
        out.tags[tag] = text
        out.ran.append(evaluator.name)
    if out.skipped:
        out.tags[SKIPPED_TAG] = "; ".join(out.skipped)
    if out.not_finite:  # a NaN logged without a word reads as a result: said once, and kept as a tag
        shown = out.not_finite[:NOTES_SHOWN] + ([f"{len(out.not_finite) - NOTES_SHOWN} more"]
                                                 if len(out.not_finite) > NOTES_SHOWN else [])
        out.tags[NOT_FINITE_TAG] = "; ".join(shown)
        progress.say(f"vaelab: warning: not finite, so not logged: {out.tags[NOT_FINITE_TAG]} (noted in "
                     f"{NOT_FINITE_TAG})")
    return out


def _finite(metrics: dict[str, float], name: str, notes: list[str]) -> dict[str, float]:
    """The finite values of `metrics`; each other one is noted in `notes` ("<metric> = nan (<evaluator>)")."""
    kept = {}
    for key, value in metrics.items():
        if math.isfinite(float(value)):
            kept[key] = value
        else:
            notes.append(f"{key} = {float(value)} ({name})")
    return kept


def _run_one(ctx: EvalContext, evaluator: Evaluator, settings: dict, suffix: str,
             show_progress: bool) -> dict[str, float]:
    per_image = evaluator.per_image(settings)
    words = evaluator.words(settings)
    label = f"eval {evaluator.name}" + (f" ({words})" if words else "")
    with progress.bar(evaluator.passes(settings), label, "pass", show=show_progress, unit_scale=True) as bar:
        started = time.perf_counter()
        metrics = evaluator.compute(ctx, settings, lambda n: bar.update(n * per_image))
        seconds = time.perf_counter() - started
    renamed = {(k + suffix if evaluator.renames(k) else k): v for k, v in metrics.items()}
    renamed[f"time/eval/{evaluator.name}{suffix}_s"] = seconds
    return renamed


def quiet_test_metrics(model, data, run, epochs_run: int = 1) -> dict[str, float]:
    """Every applicable `test/...` metric of `model` under `run`'s eval settings, quietly
    (what a run logs, without its timings): for checks and notebooks. The run's figures are
    counted as its own evaluation counts them (an evaluator capped by training's cost leaves room)."""
    from vaelab.figures import figure_passes

    drawn = figure_passes(run, len(data.train), len(data.test), epochs_run)
    out = evaluate(EvalContext(model, data, run, epochs_run, drawn), show_progress=False)
    return {k: v for k, v in out.metrics.items() if k.startswith("test/")}
