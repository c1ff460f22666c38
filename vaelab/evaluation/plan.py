"""The evaluation plan of a run in words, from its spec alone (no torch): what
`vaelab train --dry-run` prints. `vaelab sweep --dry-run` adds measured times (vaelab.cost).
Every line comes from an evaluator's record (vaelab.evaluation.evaluators)."""

from __future__ import annotations

from vaelab.evaluation.evaluators import EVALUATORS
from vaelab.evaluation.record import Evaluator
from vaelab.spec import RunSpec

NAME_WIDTH = 8  # the plan's first column; a longer name is followed by two spaces


def _named(evaluator: Evaluator, text: str) -> str:
    name = evaluator.name
    return f"{name:<{NAME_WIDTH}} {text}" if len(name) < NAME_WIDTH else f"{name}  {text}"


def describe(run: RunSpec) -> list[str]:
    """One line per evaluator (and the figures): what it computes, or why it is skipped."""
    lines = []
    for evaluator in EVALUATORS.values():
        reason = evaluator.turned_off(run)
        lines.append(_named(evaluator, f"skipped ({reason})" if reason else evaluator.plan(run)))
    e = run.eval
    figures = f"the PNG figures, t-SNE of {e.tsne_points} test points" if e.figures else "off"
    lines.append(f"figures  {figures}")
    return lines
