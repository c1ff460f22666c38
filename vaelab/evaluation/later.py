"""`vaelab evaluate`: evaluators with any settings on finished runs, without
retraining, logged into the same MLflow runs. Its defaults are the rigorous ones
(every test image for the IWAE bound, disentanglement_lib's sample sizes), not the
training-capped ones of a run's own evaluation. Metrics whose value depends on the
settings are named by them (test/nll_iw_k5000, _n1000 on a subset; test/dis/mig_s1),
so they never mix with the run's own numbers; one that is already there with the
same settings is not computed again. Metrics are written in one batch at the end,
so an interrupted evaluation leaves the run as it was. A checkpoint that names its run
(a folder, a `models:/` URI) is evaluated into it only if its weights are the ones the
run logged (their digest, `vaelab.checkpoint.sha256`), checked before anything is computed."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vaelab.checkpoint import DIGEST_TAG, MODEL_FILE, Checkpoint, load_checkpoint, load_state, weights_digest
from vaelab.errors import CheckpointError, UsageError
from vaelab.evaluation.record import EvalContext, Evaluator
from vaelab.evaluation.stage import NOT_FINITE_TAG, SKIPPED_TAG, Evaluation, evaluate, plan
from vaelab.registry import load_dataset
from vaelab.spec import RunSpec, SpecError, apply_overrides, parse_spec, to_dict
from vaelab.tracking import Tracker
from vaelab.training import resolve_device

TAG_LIMIT = 5000  # characters of one tag value (MLflow takes 8000; older servers 5000)
# What "rigorous on demand" starts from: every test image, no cap, the reference sample sizes; --set refines it.
RIGOROUS = ["eval.iw_images=null", "eval.iw_capped=false", "eval.dis_samples=1"]


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


def _own_digest(tracker: Tracker, run_id: str, scratch: Path) -> str | None:
    """The digest of the checkpoint artifact of `run_id` (None if it has none): the reference for
    runs logged before their checkpoint's digest was recorded as a tag."""
    folder = tracker.fetch_artifact(run_id, "checkpoint", scratch)
    if folder is None or not (folder / MODEL_FILE).is_file():
        return None
    return weights_digest(load_state(folder / MODEL_FILE))


def check_weights(target: str, checkpoint: Checkpoint, run_id: str, recorded: str | None,
                  reference: Callable[[], str | None]) -> None:
    """CheckpointError unless `checkpoint` holds the weights run `run_id` logged: `recorded` (its tag),
    or for a run from before such tags, `reference()` (its own checkpoint artifact's digest)."""
    source = f"its tag {DIGEST_TAG}"
    if recorded is None:
        recorded, source = reference(), "its checkpoint artifact"
        print(f"vaelab: warning: run {run_id} records no checkpoint digest (logged before vaelab did); "
              f"checking {target} against {source}", file=sys.stderr)
    if recorded is None:  # nothing to compare with: numbers of unknown weights are not written into the run
        raise CheckpointError(f"{target}: cannot tell whether these are the weights run {run_id} logged (no "
                              f"{DIGEST_TAG} tag, no checkpoint artifact); nothing was written")
    if checkpoint.digest != recorded:
        raise CheckpointError(f"{target}: its weights (sha256 {checkpoint.digest[:16]}...) are not those run "
                              f"{run_id} logged ({source}: sha256 {recorded[:16]}...); nothing was written")


def _tags_to_write(result: Evaluation, tags: dict[str, str]) -> dict[str, str]:
    """The evaluation's tags for a finished run: not its skipped list (the run's own evaluation wrote that),
    and the non-finite notes added to those the run has."""
    out = {k: v for k, v in result.tags.items() if k != SKIPPED_TAG}
    if NOT_FINITE_TAG in out and tags.get(NOT_FINITE_TAG):
        # the latest notes first, within MLflow's limit on a tag's length
        out[NOT_FINITE_TAG] = f"{out[NOT_FINITE_TAG]}; {tags[NOT_FINITE_TAG]}"[:TAG_LIMIT]
    return out


def evaluate_finished(target: str, tracker: Tracker, overrides: list[str], evaluators: list[Evaluator],
                      device: str = "auto", show_progress: bool = True, explicit: bool = False) -> EvaluatedRun:
    """Evaluate one finished run, named by its MLflow run id, its checkpoint folder, or a `models:/` or
    `runs:/` URI of its model.
    `explicit`: the evaluators were asked for by name, so one that does not apply to the
    run's data is an error (UsageError) rather than a note."""
    with tempfile.TemporaryDirectory(prefix="vaelab-eval-") as scratch:
        if target.startswith(("models:/", "runs:/")) or Path(target).is_dir():  # a checkpoint naming its run
            from_store = target.startswith(("models:/", "runs:/"))
            folder = tracker.model_folder(target, Path(scratch)) if from_store else Path(target)
            checkpoint = load_checkpoint(folder, device="cpu")
            if checkpoint.run_id is None:
                what = "the model does not name the MLflow run that made it" if from_store else \
                    "the checkpoint does not name its MLflow run"
                raise CheckpointError(f"{target}: {what} (run.json)")
            run_id = checkpoint.run_id
            record = tracker.finished_run(run_id)
            check_weights(target, checkpoint, run_id, record.data.tags.get(DIGEST_TAG),
                          lambda: _own_digest(tracker, run_id, Path(scratch) / "own"))
        else:
            run_id = target
            record = tracker.finished_run(run_id)
            checkpoint = load_checkpoint(_checkpoint_folder(tracker, run_id, Path(scratch)), device="cpu")
            if DIGEST_TAG in record.data.tags:  # the run's own checkpoint: it must still be what the run logged
                check_weights(target, checkpoint, run_id, record.data.tags[DIGEST_TAG], lambda: None)
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
        tracked.set_tags(_tags_to_write(result, dict(record.data.tags)))
    return EvaluatedRun(run_id, result)
