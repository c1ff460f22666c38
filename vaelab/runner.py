"""One tracked training run: spec -> data + model -> fit -> evaluate -> figures
-> checkpoint, all recorded in one MLflow run. `vaelab train` calls `run`, and
sweeps hand each of their run specs to the same function."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from vaelab import figures, preflight
from vaelab.checkpoint import save_checkpoint
from vaelab.data import ImageData
from vaelab.evaluate import evaluate_test, kl_per_dimension, latent_means
from vaelab.objectives import kl_weighting
from vaelab.registry import load_dataset
from vaelab.resume import TrainState, clear_state, holding, load_state, save_state, state_dir
from vaelab.spec import RunSpec, flatten
from vaelab.stacked import fit_stack
from vaelab.tracking import TrackedRun, Tracker, local_path
from vaelab.train import EpochCallback, RunResult, fit, init_model, resolve_device

CHECKPOINT_DIR = "checkpoint"
FIGURES_DIR = "figures"

# What each metric means, stored on the run so no one misreads a sign or a unit.
METRIC_NOTES = (
    "Units: nats per image. test/elbo is the NEGATIVE ELBO (recon + kl, beta=1): lower is better. "
    "recon = -log p(x|z); kl = KL(q(z|x) || N(0,I)); loss = recon + beta*kl; mse is per pixel."
)


@dataclass
class RunOutcome:
    run_id: str
    metrics: dict[str, float]
    artifact_uri: str
    history: list[dict[str, float]]
    best_epoch: int

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    def best(self, metric: str) -> float:
        """`metric` at the epoch whose weights were kept (the best val/loss)."""
        return self.history[self.best_epoch - 1][metric]

    @property
    def checkpoint_dir(self) -> Path | None:
        base = local_path(self.artifact_uri)
        return base / CHECKPOINT_DIR if base else None


def run_name(run_spec: RunSpec) -> str:
    m, loss = run_spec.model, run_spec.loss
    return f"{m.arch}-z{m.z_dim}-{loss.likelihood}-b{loss.beta:g}-s{run_spec.train.seed}"


def write_figures(model, likelihood, data: ImageData, history, folder: Path, run_spec: RunSpec) -> None:
    seed = run_spec.train.seed
    test = data.test
    folder.mkdir(parents=True, exist_ok=True)
    n_tsne = min(run_spec.eval.tsne_points, len(test))
    with ThreadPoolExecutor(max_workers=1) as pool:
        # t-SNE is the slowest figure and pure numerics: it runs beside the plotting (matplotlib stays on
        # this thread, which it needs).
        tsne = None
        if n_tsne >= 10:
            means = latent_means(model, test.x[:n_tsne], run_spec.eval.batch_size, test.y[:n_tsne])
            tsne = pool.submit(figures.tsne_embedding, means, seed)
        figures.write_reconstructions(model, likelihood, test.x[:32], folder / "reconstructions.png", test.y[:32])
        figures.write_samples(model, likelihood, folder / "samples.png", n=64, seed=seed)
        pairs = min(8, len(test)) // 2 * 2  # consecutive test images form the interpolation pairs
        if pairs:
            figures.write_interpolation(model, likelihood, test.x[:pairs], folder / "interpolation.png",
                                        y=test.y[:pairs])
        figures.write_learning_curves(history, folder / "learning_curves.png")
        kl_dims = kl_per_dimension(model, test.x[:2000], run_spec.eval.batch_size, test.y[:2000])
        figures.write_kl_per_dimension(kl_dims, folder / "kl_per_dimension.png")
        figures.write_traversals(model, likelihood, test.x[:1], kl_dims, folder / "traversals.png", y=test.y[:1])
        if tsne is not None:
            figures.write_tsne(means, test.y[:n_tsne], folder / "tsne.png", data.class_names, seed=seed,
                               points=tsne.result())


def _epoch_figures(run_spec: RunSpec, model, data: ImageData, tracked) -> EpochCallback:
    """Reconstructions and samples every train.figure_every epochs, named by epoch."""
    every = run_spec.train.figure_every

    def callback(epoch: int, _metrics: dict) -> None:
        if not every or epoch % every:
            return
        with tempfile.TemporaryDirectory(prefix="vaelab-") as tmp:
            folder = Path(tmp)
            figures.write_reconstructions(model, model.likelihood, data.test.x[:32],
                                          folder / f"reconstructions_e{epoch:04d}.png", data.test.y[:32])
            figures.write_samples(model, model.likelihood, folder / f"samples_e{epoch:04d}.png",
                                  seed=run_spec.train.seed)
            tracked.log_artifacts(folder, f"{FIGURES_DIR}/epochs")
        model.train()

    return callback


def _tags(run_spec: RunSpec, data: ImageData, device, flight, extra_tags: dict[str, str] | None) -> dict:
    return {
        "vaelab.run_hash": run_spec.hash(),
        "vaelab.data": data.description,
        "vaelab.device": str(device),
        "vaelab.n_params": flight.n_params,
        "vaelab.activation_mb": round(flight.activation_mb, 1),
        "mlflow.note.content": METRIC_NOTES,
        **(extra_tags or {}),
    }


class _TimedRun:
    """Wraps a TrackedRun's per-epoch logging to count the seconds tracking costs
    (reported as time/tracking_s, so the overhead of a run is measured, not guessed)."""

    def __init__(self, tracked: TrackedRun, seconds: float = 0.0):
        self.tracked, self.seconds = tracked, seconds

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        started = time.perf_counter()
        self.tracked.log_epoch(epoch, metrics)
        self.seconds += time.perf_counter() - started


def _finish(run_spec: RunSpec, experiment: str, model, data: ImageData, result: RunResult,
            tracked: TrackedRun, tracking_s: float = 0.0) -> RunOutcome:
    """Test metrics, figures and the checkpoint of a trained model, recorded in `tracked`.
    Logs where the time went: time/eval_s (test metrics), time/tracking_s (MLflow
    writes) and time/artifacts_s (figures, checkpoint and their upload)."""
    likelihood = model.likelihood
    started = time.perf_counter()
    metrics = evaluate_test(model, data.test, likelihood, kl_weighting(run_spec), run_spec.eval.batch_size,
                            run_spec.train.seed, iw_samples=run_spec.eval.iw_samples,
                            probe_train=data.train if run_spec.eval.probe else None)
    metrics.update({"train/best_epoch": result.best_epoch, "train/epochs_run": result.epochs_run,
                    "time/train_s": sum(h["time/epoch_s"] for h in result.history),
                    "time/eval_s": time.perf_counter() - started})
    # Validation numbers of the weights that were kept (the sweep objective, and the report's "best").
    kept = result.history[result.best_epoch - 1]
    metrics.update({f"best/{k}": v for k, v in kept.items() if k.startswith("val/")})
    started = time.perf_counter()
    tracked.log_metrics(metrics, step=result.epochs_run)
    tracked.set_tags({"vaelab.stopped_early": result.stopped_early})
    tracking_s += time.perf_counter() - started
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vaelab-") as tmp:
        if run_spec.eval.figures:
            write_figures(model, likelihood, data, result.history, Path(tmp) / FIGURES_DIR, run_spec)
        save_checkpoint(Path(tmp) / CHECKPOINT_DIR, model, run_spec, experiment, metrics)
        tracked.log_artifacts(Path(tmp))
    timings = {"time/artifacts_s": time.perf_counter() - started, "time/tracking_s": tracking_s}
    tracked.log_metrics(timings, step=result.epochs_run)
    metrics.update(timings)
    return RunOutcome(tracked.run_id, metrics, tracked.artifact_uri, result.history, result.best_epoch)


def run(
    run_spec: RunSpec,
    experiment: str,
    tracker: Tracker,
    show_progress: bool = True,
    extra_tags: dict[str, str] | None = None,
    epoch_callbacks: list[EpochCallback] | None = None,
    on_start: Callable[[str], None] | None = None,
    name: str | None = None,
) -> RunOutcome:
    """Train and evaluate one run, recording everything in `tracker`. Bad input
    (data, model shape) raises before any MLflow run is created."""
    device = resolve_device(run_spec.train.device)
    data = load_dataset(run_spec.data, device)
    model = init_model(run_spec, data.shape, device)
    flight = preflight.check(model, data.shape, run_spec.train.batch_size, device)
    tags = _tags(run_spec, data, device, flight, extra_tags)
    run_hash = tags["vaelab.run_hash"]
    folder = state_dir(tracker.resume_root, experiment, run_hash)
    with holding(folder):
        started = time.perf_counter()
        prior = load_state(folder, run_hash)
        tracked = tracker.reopen_run(prior.run_id) if prior is not None else None
        if tracked is None:  # nothing to resume (or its MLflow run is gone): a fresh run
            prior = None
            tracked = tracker.open_run(experiment, name or run_name(run_spec), tags)
        try:
            if on_start is not None:
                on_start(tracked.run_id)
            if prior is None:
                tracked.log_params(flatten(run_spec))
            else:
                tracked.set_tags({"vaelab.resumed_from_epoch": prior.epoch})
            timed = _TimedRun(tracked, time.perf_counter() - started)
            snapshots = _epoch_figures(run_spec, model, data, tracked)

            def save(state: TrainState) -> None:
                state.run_id, state.run_hash = tracked.run_id, run_hash
                save_state(folder, state)

            result = fit(run_spec, model, data, callbacks=[timed.log_epoch, snapshots, *(epoch_callbacks or [])],
                         show_progress=show_progress, likelihood=model.likelihood, resume=prior, save_state=save)
            if result.notes:
                tracked.set_tags({"vaelab.notes": "; ".join(result.notes)})
            outcome = _finish(run_spec, experiment, model, data, result, tracked, timed.seconds)
        except BaseException as err:
            tracker.end_run(tracked, err)
            if not isinstance(err, KeyboardInterrupt):  # interrupted runs resume; failed ones start afresh
                clear_state(folder)
            raise
        tracker.end_run(tracked)
        clear_state(folder)
        return outcome


def run_stack(
    run_specs: list[RunSpec],
    experiment: str,
    tracker: Tracker,
    show_progress: bool = True,
    extra_tags: list[dict[str, str]] | None = None,
    on_start: list[Callable[[str], None]] | None = None,
    names: list[str] | None = None,
) -> list[RunOutcome | BaseException]:
    """Train runs that differ only in stackable keys (vaelab.stacked) as one stacked
    model, each recorded as its own MLflow run with its own metrics, figures and
    checkpoint. Returns, per run, its outcome or the error that failed it alone;
    an error that stops the whole stack (Ctrl-C, bad data) ends every run and raises."""
    k = len(run_specs)
    device = resolve_device(run_specs[0].train.device)
    data = load_dataset(run_specs[0].data, device)
    models = [init_model(r, data.shape, device) for r in run_specs]
    # The stack's activations are K batches' worth.
    flight = preflight.check(models[0], data.shape, run_specs[0].train.batch_size * k, device)
    extra_tags = extra_tags or [{} for _ in run_specs]
    names = names or [run_name(r) for r in run_specs]
    open_runs: dict[int, TrackedRun] = {}
    outcomes: list[RunOutcome | BaseException] = []
    try:
        for i, r in enumerate(run_specs):
            tags = {**_tags(r, data, device, flight, extra_tags[i]), "vaelab.stacked": k}
            open_runs[i] = tracker.open_run(experiment, names[i], tags)
            if on_start is not None:
                on_start[i](open_runs[i].run_id)
            open_runs[i].log_params(flatten(r))
        members = fit_stack(run_specs, models, data, callbacks=[[open_runs[i].log_epoch] for i in range(k)],
                            show_progress=show_progress)
        for i, (r, model, member) in enumerate(zip(run_specs, models, members, strict=True)):
            try:
                if member.error is not None:
                    raise member.error
                outcomes.append(_finish(r, experiment, model, data, member.result, open_runs[i]))
            except Exception as err:  # this run fails alone
                outcomes.append(err)
                tracker.end_run(open_runs.pop(i), err)
                continue
            tracker.end_run(open_runs.pop(i))
    except BaseException as err:
        for tracked in open_runs.values():
            tracker.end_run(tracked, err)
        raise
    return outcomes
