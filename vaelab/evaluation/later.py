"""`vaelab evaluate`: evaluators with any settings on finished runs, without
retraining, logged into the same MLflow runs. The IWAE metrics of such an
evaluation are named by their settings (test/nll_iw_k5000; _n1000 on a subset),
so they never mix with the run's own numbers; one that is already there with the
same settings is not computed again. Metrics are written in one batch at the end,
so an interrupted evaluation leaves the run as it was."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from vaelab.checkpoint import load_checkpoint
from vaelab.errors import CheckpointError, UsageError
from vaelab.evaluation.evaluators import EvalContext, Evaluator
from vaelab.evaluation.stage import Evaluation, evaluate, plan
from vaelab.registry import load_dataset
from vaelab.spec import RunSpec, SpecError, apply_overrides, parse_spec, to_dict
from vaelab.tracking import Tracker
from vaelab.training import resolve_device

# What "rigorous on demand" starts from: every test image, no cap; --set refines it.
RIGOROUS = ["eval.iw_images=null", "eval.iw_capped=false"]


@dataclass
class EvaluatedRun:
    run_id: str
    evaluation: Evaluation
    settings: dict = field(default_factory=dict)


def with_eval_overrides(run: RunSpec, overrides: list[str]) -> RunSpec:
    """`run` with eval.* values set; anything else would change what was trained."""
    for item in overrides:
        if not item.partition("=")[0].strip().startswith("eval."):
            raise UsageError(f"--set {item}: only eval.* keys can change after training")
    spec = parse_spec({"name": "evaluate", "base": to_dict(run)})
    try:
        return apply_overrides(spec, RIGOROUS + list(overrides)).base
    except SpecError as err:
        raise UsageError(str(err)) from None


def _checkpoint_folder(tracker: Tracker, run_id: str, scratch: Path) -> Path:
    folder = tracker.fetch_artifact(run_id, "checkpoint", scratch)
    if folder is None or not (folder / "model.pt").is_file():
        raise CheckpointError(f"run {run_id} has no checkpoint to evaluate")
    return folder


def evaluate_finished(target: str, tracker: Tracker, overrides: list[str], evaluators: list[Evaluator],
                      device: str = "auto", show_progress: bool = True, explicit: bool = False) -> EvaluatedRun:
    """Evaluate one finished run, named by its MLflow run id, its checkpoint folder, or a `models:/` or
    `runs:/` URI of its model.
    `explicit`: the evaluators were asked for by name, so one that does not apply to the
    run's data is an error (UsageError) rather than a note."""
    with tempfile.TemporaryDirectory(prefix="vaelab-eval-") as scratch:
        if target.startswith(("models:/", "runs:/")):  # a registered or logged model: the run that made it
            checkpoint = load_checkpoint(tracker.model_folder(target, Path(scratch)), device="cpu")
            if checkpoint.run_id is None:
                raise CheckpointError(f"{target}: the model does not name the MLflow run that made it (run.json)")
            run_id = checkpoint.run_id
            record = tracker.finished_run(run_id)
        elif Path(target).is_dir():
            checkpoint = load_checkpoint(target, device="cpu")
            if checkpoint.run_id is None:
                raise CheckpointError(f"{target}: the checkpoint does not name its MLflow run (run.json)")
            run_id = checkpoint.run_id
            record = tracker.finished_run(run_id)
        else:
            run_id = target
            record = tracker.finished_run(run_id)
            checkpoint = load_checkpoint(_checkpoint_folder(tracker, run_id, Path(scratch)), device="cpu")
    run = with_eval_overrides(checkpoint.run_spec, overrides)
    torch_device = resolve_device(device)
    data = load_dataset(run.data, torch_device, show_progress)
    epochs = int(record.data.metrics.get("train/epochs_run", 1))
    context = EvalContext(checkpoint.model.to(torch_device), data, run, epochs)
    if explicit:
        for evaluator, _settings, reason in plan(context, evaluators):
            if reason is not None:
                raise UsageError(f"--metrics {evaluator.name}: does not apply to run {run_id}: {reason}")
    result = evaluate(context, evaluators, show_progress=show_progress, marked=True,
                      done_tags=dict(record.data.tags))
    if result.metrics:
        tracked = tracker.attach(run_id)
        tracked.log_metrics(result.metrics, step=epochs)  # one batch: all or nothing
        tracked.set_tags({k: v for k, v in result.tags.items() if k != "vaelab.eval.skipped"})
    return EvaluatedRun(run_id, result)
