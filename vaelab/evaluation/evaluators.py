"""The evaluators, in the order they run: the registry the stage, the plan, the cost, the
report and the CLI loop over. Each is one module of this package with its `EVALUATOR`
record (vaelab.evaluation.record). Adding one: a module with its record, listed in
_RECORDS, and its tests; nothing else names it. Imports no torch."""

from __future__ import annotations

from vaelab.evaluation import disentanglement, elbo, iwae, latents, probe
from vaelab.evaluation.record import EvalContext, Evaluator, Facts, Metric

__all__ = ["EVALUATORS", "EvalContext", "Evaluator", "Facts", "Metric", "metrics", "owner"]

_RECORDS = (elbo.EVALUATOR, latents.EVALUATOR, iwae.EVALUATOR, probe.EVALUATOR, disentanglement.EVALUATOR)
EVALUATORS: dict[str, Evaluator] = {e.name: e for e in _RECORDS}


def metrics() -> list[tuple[Evaluator, Metric]]:
    """Every metric of every evaluator, in run order."""
    return [(evaluator, metric) for evaluator in EVALUATORS.values() for metric in evaluator.metrics]


def owner(key: str) -> tuple[Evaluator, Metric] | None:
    """The evaluator and metric a logged key belongs to (a family member, a settings-marked name), or None."""
    for evaluator in EVALUATORS.values():
        metric = evaluator.owns(key)
        if metric is not None:
            return evaluator, metric
    return None
