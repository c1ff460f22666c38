"""A trained member finished into its run log: test metrics (the evaluation stage), the kept
weights' model record, figures, the checkpoint, and where the time went."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from vaelab import progress
from vaelab.checkpoint import DIGEST_TAG, read_run_record, save_checkpoint
from vaelab.data import ImageData
from vaelab.evaluation.record import EvalContext
from vaelab.evaluation.stage import evaluate
from vaelab.figures import figure_passes, figure_plan, write_thumbnail
from vaelab.runlog import RunLog
from vaelab.runner.figures import COMPARED_FIGURES, FIGURE_STEPS, write_figures
from vaelab.runner.model_record import ModelRecord
from vaelab.runner.outcome import CHECKPOINT_DIR, FIGURES_DIR, RunOutcome
from vaelab.spec import RunSpec
from vaelab.training import RunResult


def finish(run_spec: RunSpec, experiment: str, model, data: ImageData, result: RunResult, log: RunLog,
           tracking_s: float = 0.0, show_progress: bool = False) -> RunOutcome:
    """Test metrics, figures and the checkpoint of a trained model, recorded in `log`.
    Logs where the time went: time/eval_s (test metrics; time/eval/<name>_s each),
    time/tracking_s (run-log writes), time/figures_s (drawing), time/upload_s (checkpoint and upload) and
    time/artifacts_s (their sum)."""
    likelihood = model.likelihood
    plan = figure_plan(run_spec, len(data.train), len(data.test), result.epochs_run)
    # The figures' passes are reserved: an evaluator capped by training's cost leaves room for them.
    context = EvalContext(model, data, run_spec, result.epochs_run,
                          figure_passes(run_spec, len(data.train), len(data.test), result.epochs_run))
    evaluation = evaluate(context, show_progress=show_progress)
    metrics = dict(evaluation.metrics)
    metrics.update({"train/best_epoch": result.best_epoch, "train/epochs_run": result.epochs_run,
                    "time/train_s": sum(h["time/epoch_s"] for h in result.history),
                    "time/eval_s": evaluation.seconds})
    # Validation numbers of the weights that were kept (the sweep objective, and the report's "best").
    kept = result.history[result.best_epoch - 1]
    metrics.update({f"best/{k}": v for k, v in kept.items() if k.startswith("val/")})
    started = time.perf_counter()
    record = ModelRecord(log, run_spec, step=result.epochs_run)
    record.log_metrics(metrics)
    log.set_tags({"vaelab.stopped_early": result.stopped_early, "vaelab.model_id": record.model_id or "",
                  **evaluation.tags})
    tracking_s += time.perf_counter() - started
    started = time.perf_counter()
    figures_s = 0.0
    try:
        with tempfile.TemporaryDirectory(prefix="vaelab-") as tmp, \
                progress.bar((FIGURE_STEPS if run_spec.eval.figures else 0) + 2, "figures and checkpoint", "step",
                             show=show_progress) as bar:
            if run_spec.eval.figures:
                write_figures(model, likelihood, data, result.history, Path(tmp) / FIGURES_DIR, run_spec,
                              step=lambda: bar.update(1), plan=plan, metrics=metrics)
                # MLflow's compare view lines up only top-level files: the key figures go there too, as
                # thumbnails (each figure is stored once, in figures/).
                for name in COMPARED_FIGURES:
                    if (Path(tmp) / FIGURES_DIR / name).is_file():
                        write_thumbnail(Path(tmp) / FIGURES_DIR / name, Path(tmp) / name)
                figures_s = time.perf_counter() - started
            folder = save_checkpoint(Path(tmp) / CHECKPOINT_DIR, model, run_spec, experiment, metrics,
                                     run_id=log.run_id, classes=data.class_names)
            # The run names the weights it logged, so a later evaluation can refuse any others (run.json says it too).
            written = read_run_record(folder)
            if written is not None and written.digest:
                log.set_tags({DIGEST_TAG: written.digest})
            bar.update(1)
            bar.set_description("uploading figures and checkpoint")
            log.log_artifacts(Path(tmp))
            record.finish(Path(tmp) / CHECKPOINT_DIR)
            bar.update(1)
    except BaseException:
        record.abandon()
        raise
    artifacts_s = time.perf_counter() - started
    # Drawing figures is the run's own output; writing the checkpoint and sending both to the store is tracking.
    timings = {"time/artifacts_s": artifacts_s, "time/figures_s": figures_s,
               "time/upload_s": artifacts_s - figures_s, "time/tracking_s": tracking_s}
    log.log_metrics(timings, step=result.epochs_run)
    metrics.update(timings)
    return RunOutcome(log.run_id, metrics, log.artifact_uri, result.history, result.best_epoch)
