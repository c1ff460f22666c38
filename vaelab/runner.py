"""One tracked training run: spec -> data + model -> fit -> evaluate -> figures
-> checkpoint, all recorded in one MLflow run. `vaelab train` calls `run`, and
sweeps hand each of their run specs to the same function."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from vaelab import figures, preflight
from vaelab.checkpoint import DIGEST_TAG, read_run_record, save_checkpoint
from vaelab.data import ImageData
from vaelab.errors import LeaseLost, RunStopped
from vaelab.evaluate import kl_per_dimension, latent_means
from vaelab.evaluation.evaluators import EvalContext
from vaelab.evaluation.stage import evaluate
from vaelab.registry import load_dataset
from vaelab.resume import TrainState, clear_state, holding, load_state, save_state, state_dir
from vaelab.spec import RunSpec, flatten, unused_keys
from vaelab.tracking import TrackedRun, Tracker, local_path
from vaelab.training import EpochCallback, MemberResult, RunResult, fit_group, init_model, resolve_device
from vaelab.training.session import forget_stop, stop_requested

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


# Figures also logged at the artifact root, so MLflow's compare view shows them side by side across runs.
COMPARED_FIGURES = ("samples.png", "reconstructions.png", "traversals.png", "learning_curves.png")
# The spec keys a run does not use (not logged as params: spec.unused_keys), listed in one tag.
UNUSED_TAG = "vaelab.params_not_used"
FIGURE_STEPS = 8  # for the progress bar: one step per figure written


def write_figures(model, likelihood, data: ImageData, history, folder: Path, run_spec: RunSpec,
                  step: Callable[[], None] = lambda: None) -> None:
    """Every figure of a finished run into `folder`; `step()` after each one (a progress bar)."""
    seed = run_spec.train.seed
    test = data.test
    folder.mkdir(parents=True, exist_ok=True)
    n_tsne = min(run_spec.eval.tsne_points, len(test))
    with ThreadPoolExecutor(max_workers=1) as pool:
        # t-SNE is the slowest figure and pure numerics: it runs beside the plotting (matplotlib stays on
        # this thread, which it needs).
        tsne = None
        if n_tsne >= 10:
            means = latent_means(model, test.x.first(n_tsne), run_spec.eval.batch_size, test.y[:n_tsne])
            tsne = pool.submit(figures.tsne_embedding, means, seed)
        figures.write_reconstructions(model, likelihood, test.x[:32], folder / "reconstructions.png", test.y[:32])
        step()
        figures.write_samples(model, likelihood, folder / "samples.png", n=64, seed=seed)
        step()
        pairs = min(8, len(test)) // 2 * 2  # consecutive test images form the interpolation pairs
        if pairs:
            figures.write_interpolation(model, likelihood, test.x[:pairs], folder / "interpolation.png",
                                        y=test.y[:pairs])
        step()
        figures.write_learning_curves(history, folder / "learning_curves.png")
        step()
        kl_dims = kl_per_dimension(model, test.x.first(2000), run_spec.eval.batch_size, test.y[:2000])
        figures.write_kl_per_dimension(kl_dims, folder / "kl_per_dimension.png")
        step()
        figures.write_traversals(model, likelihood, test.x[:1], kl_dims, folder / "traversals.png", y=test.y[:1])
        step()
        if data.factors is not None and run_spec.eval.disentanglement and not model.num_classes:
            from vaelab.disentanglement.figures import FIGURE_SAMPLES, write_factor_figures

            samples = max(1000, round(FIGURE_SAMPLES * run_spec.eval.dis_samples))  # as many as MIG draws
            write_factor_figures(model, likelihood, data.factors, folder, seed + 1, samples, run_spec.eval.batch_size)
        step()
        if tsne is not None:
            figures.write_tsne(means, test.y[:n_tsne], folder / "tsne.png", data.class_names, seed=seed,
                               points=tsne.result())
        step()


def _epoch_figures(run_spec: RunSpec, model, data: ImageData, tracked) -> EpochCallback:
    """Reconstructions and samples every train.figure_every epochs, named by epoch."""
    every = run_spec.train.figure_every

    def callback(epoch: int, _metrics: dict) -> None:
        if not every or epoch % every:
            return
        with tempfile.TemporaryDirectory(prefix="vaelab-") as tmp:
            folder = Path(tmp)
            figures.write_reconstructions(model, model.likelihood, data.test.x[:32],
                                          folder / "reconstructions.png", data.test.y[:32])
            figures.write_samples(model, model.likelihood, folder / "samples.png", seed=run_spec.train.seed)
            # MLflow's image logging with the epoch as its step: the run page's image view slides through them.
            for name in ("reconstructions", "samples"):
                tracked.log_image(folder / f"{name}.png", key=name, step=epoch)
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
            tracked: TrackedRun, tracking_s: float = 0.0, show_progress: bool = False) -> RunOutcome:
    """Test metrics, figures and the checkpoint of a trained model, recorded in `tracked`.
    Logs where the time went: time/eval_s (test metrics; time/eval/<name>_s each),
    time/tracking_s (MLflow writes), time/figures_s (drawing), time/upload_s (checkpoint and upload) and
    time/artifacts_s (their sum)."""
    likelihood = model.likelihood
    context = EvalContext(model, data, run_spec, result.epochs_run)
    evaluation = evaluate(context, show_progress=show_progress)
    metrics = dict(evaluation.metrics)
    metrics.update({"train/best_epoch": result.best_epoch, "train/epochs_run": result.epochs_run,
                    "time/train_s": sum(h["time/epoch_s"] for h in result.history),
                    "time/eval_s": evaluation.seconds})
    # Validation numbers of the weights that were kept (the sweep objective, and the report's "best").
    kept = result.history[result.best_epoch - 1]
    metrics.update({f"best/{k}": v for k, v in kept.items() if k.startswith("val/")})
    started = time.perf_counter()
    # The kept weights become an MLflow LoggedModel; the test metrics are logged linked to it. A store that
    # has no LoggedModels (an MLflow 2 server) still gets every metric, unlinked.
    model_id = tracked.try_start_model({"arch": run_spec.model.arch, "z_dim": run_spec.model.z_dim,
                                        "likelihood": run_spec.loss.likelihood, "run_hash": run_spec.hash()})
    test = {k: v for k, v in metrics.items() if k.startswith("test/")} if model_id else {}
    if model_id:
        tracked.log_model_metrics(model_id, test, step=result.epochs_run)
    tracked.log_metrics({k: v for k, v in metrics.items() if k not in test}, step=result.epochs_run)
    tracked.set_tags({"vaelab.stopped_early": result.stopped_early, "vaelab.model_id": model_id or "",
                      **evaluation.tags})
    tracking_s += time.perf_counter() - started
    started = time.perf_counter()
    figures_s = 0.0
    ready = False
    try:
        with tempfile.TemporaryDirectory(prefix="vaelab-") as tmp, \
                tqdm(total=(FIGURE_STEPS if run_spec.eval.figures else 0) + 2, desc="figures and checkpoint",
                     unit="step", disable=not show_progress, dynamic_ncols=True) as bar:
            if run_spec.eval.figures:
                write_figures(model, likelihood, data, result.history, Path(tmp) / FIGURES_DIR, run_spec,
                              step=lambda: bar.update(1))
                # MLflow's compare view lines up only top-level files: the key figures go there too.
                for name in COMPARED_FIGURES:
                    if (Path(tmp) / FIGURES_DIR / name).is_file():
                        shutil.copyfile(Path(tmp) / FIGURES_DIR / name, Path(tmp) / name)
                figures_s = time.perf_counter() - started
            folder = save_checkpoint(Path(tmp) / CHECKPOINT_DIR, model, run_spec, experiment, metrics,
                                     run_id=tracked.run_id)
            # The run names the weights it logged, so a later evaluation can refuse any others (run.json says it too).
            written = read_run_record(folder)
            if written is not None and written.digest:
                tracked.set_tags({DIGEST_TAG: written.digest})
            bar.update(1)
            bar.set_description("uploading figures and checkpoint")
            tracked.log_artifacts(Path(tmp))
            if model_id:
                tracked.finish_model(model_id, Path(tmp) / CHECKPOINT_DIR, step=result.epochs_run)
                ready = True
            bar.update(1)
    except BaseException:
        if model_id and not ready:  # no model is left PENDING: a resumed run makes a new one
            tracked.finish_model(model_id, None, step=result.epochs_run)
        raise
    artifacts_s = time.perf_counter() - started
    # Drawing figures is the run's own output; writing the checkpoint and sending both to the store is tracking.
    timings = {"time/artifacts_s": artifacts_s, "time/figures_s": figures_s,
               "time/upload_s": artifacts_s - figures_s, "time/tracking_s": tracking_s}
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
    guard: Callable[[], None] | None = None,
) -> RunOutcome:
    """Train and evaluate one run, recording everything in `tracker`; raises what
    ended it (a failure, a pruner's decision, RunStopped after Ctrl-C). Bad input
    (data, model shape) raises before any MLflow run is created."""
    (outcome,) = run_group([run_spec], experiment, tracker, show_progress, [extra_tags or {}],
                           [list(epoch_callbacks or [])], [on_start] if on_start else None, [name] if name else None,
                           [guard] if guard else None)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def run_stack(
    run_specs: list[RunSpec],
    experiment: str,
    tracker: Tracker,
    show_progress: bool = True,
    extra_tags: list[dict[str, str]] | None = None,
    on_start: list[Callable[[str], None]] | None = None,
    names: list[str] | None = None,
    guards: list[Callable[[], None]] | None = None,
) -> list[RunOutcome | BaseException]:
    """Train runs that differ only in stackable keys (vaelab.training.stacked) as one
    stacked model, each recorded as its own MLflow run with its own metrics, figures,
    checkpoint and resume state. Returns, per run, its outcome or the error that ended
    it alone (RunStopped for a run stopped by Ctrl-C, which resumes)."""
    return run_group(run_specs, experiment, tracker, show_progress, extra_tags, None, on_start, names, guards)


def system_metrics_wanted(setting: bool | str, tracking_uri: str) -> bool:
    """train.system_metrics: auto samples the machine when runs go to a tracking server (their overhead is
    under 1 % of a run: bench/RESULTS.md), not into a local SQLite file, where the sampler thread would be
    a second writer on one file beside every local sweep worker's."""
    if setting == "auto":
        return tracking_uri.startswith(("http://", "https://"))
    return bool(setting)


@dataclass
class _Opened:
    """A member's MLflow run and resume state, opened before training."""

    tracked: TrackedRun
    timed: _TimedRun
    folder: Path
    run_hash: str
    prior: TrainState | None

    def save(self, state: TrainState) -> None:
        state.run_id, state.run_hash = self.tracked.run_id, self.run_hash
        save_state(self.folder, state)


def _open(tracker: Tracker, run_spec: RunSpec, experiment: str, name: str, tags: dict,
          on_start: Callable[[str], None] | None, datasets: list[dict],
          guard: Callable[[], None] | None = None) -> _Opened:
    """The run's MLflow run: the one its resume state names (RUNNING again), else a new one."""
    started = time.perf_counter()
    run_hash = tags["vaelab.run_hash"]
    folder = state_dir(tracker.resume_root, experiment, run_hash)
    prior = load_state(folder, run_hash)
    tracked = tracker.reopen_run(prior.run_id) if prior is not None else None
    if tracked is None:  # nothing to resume (or its MLflow run is gone): a fresh run
        prior = None
        tracked = tracker.open_run(experiment, name, tags)
    if guard is not None:
        tracked.guard = guard
    opened = _Opened(tracked, _TimedRun(tracked), folder, run_hash, prior)
    try:
        if on_start is not None:
            on_start(tracked.run_id)
        if system_metrics_wanted(run_spec.train.system_metrics, tracker.uri):
            tracked.start_system_metrics(run_spec.train.system_metrics_s)
        if prior is None:
            unused = unused_keys(run_spec)
            tracked.log_params({k: v for k, v in flatten(run_spec).items() if k not in unused})
            tracked.set_tags({UNUSED_TAG: ", ".join(sorted(unused))})
            tracked.log_datasets(datasets)
        else:  # the tags of whoever resumes it (a re-queued trial has another number)
            tracked.set_tags({**tags, "vaelab.resumed_from_epoch": prior.epoch})
    except BaseException as err:  # no run is left RUNNING behind
        tracker.end_run(tracked, err)
        raise
    opened.timed.seconds = time.perf_counter() - started
    return opened


def run_group(
    run_specs: list[RunSpec],
    experiment: str,
    tracker: Tracker,
    show_progress: bool = True,
    extra_tags: list[dict[str, str]] | None = None,
    epoch_callbacks: list[list[EpochCallback]] | None = None,
    on_start: list[Callable[[str], None]] | None = None,
    names: list[str] | None = None,
    guards: list[Callable[[], None]] | None = None,
    on_settled: list[Callable[[RunOutcome | BaseException], None]] | None = None,
) -> list[RunOutcome | BaseException]:
    """The one tracked path: one run, or several that share a stack key, trained by
    vaelab.training.fit_group and each finished (test metrics, figures, checkpoint)
    in its own MLflow run. Runs resuming from different epochs train one group after
    another. An error that stops them all (bad data, a second Ctrl-C) ends every open
    run and raises; runs settled before it keep their outcome. `guards[i]` is called
    before every write to run i's MLflow run (a sweep's fencing: it raises LeaseLost
    once the run is another worker's). `on_settled[i]` gets run i's outcome as soon as
    its MLflow run is ended, before the next run is settled: a sweep tells Optuna there,
    so an error that comes later gives back only the runs not yet told."""
    k = len(run_specs)
    forget_stop()
    device = resolve_device(run_specs[0].train.device)
    data = load_dataset(run_specs[0].data, device, show_progress)
    models = [init_model(r, data.shape, device) for r in run_specs]
    # A stack's activations are K batches' worth.
    flight = preflight.check(models[0], data.shape, run_specs[0].train.batch_size * k, device)
    datasets = data.records()
    extra_tags = extra_tags or [{} for _ in run_specs]
    names = names or [run_name(r) for r in run_specs]
    outcomes: dict[int, RunOutcome | BaseException] = {}
    opened: dict[int, _Opened] = {}
    with ExitStack() as held:
        try:
            for i, r in enumerate(run_specs):
                tags = {**_tags(r, data, device, flight, extra_tags[i]), **({"vaelab.stacked": k} if k > 1 else {})}
                held.enter_context(holding(state_dir(tracker.resume_root, experiment, tags["vaelab.run_hash"])))
                opened[i] = _open(tracker, r, experiment, names[i], tags, on_start[i] if on_start else None,
                                  datasets, guards[i] if guards else None)
                prior = opened[i].prior
                if show_progress and prior is not None:
                    tqdm.write(f"resuming run {opened[i].tracked.run_id} ({names[i]}) after epoch {prior.epoch} of "
                               f"{r.train.epochs}", file=sys.stderr)
            by_epoch: dict[int, list[int]] = {}
            for i, o in opened.items():
                by_epoch.setdefault(o.prior.epoch if o.prior else 0, []).append(i)
            for group in by_epoch.values():
                results = _fit(group, run_specs, models, data, opened, epoch_callbacks, show_progress)
                for i, member in zip(group, results, strict=True):
                    outcomes[i] = _settle(tracker, run_specs[i], experiment, models[i], data, member, opened[i],
                                          show_progress)
                    del opened[i]
                    if on_settled is not None:
                        on_settled[i](outcomes[i])
        except BaseException as err:
            for o in opened.values():
                tracker.end_run(o.tracked, err)
            raise
    return [outcomes[i] for i in range(k)]


def _fit(group: list[int], run_specs: list[RunSpec], models: list, data: ImageData, opened: dict[int, _Opened],
         epoch_callbacks: list[list[EpochCallback]] | None, show_progress: bool) -> list[MemberResult]:
    """Train one group of members that resume from the same epoch. An error of the group's
    own (out of memory, a compiler crash) fails its members, not runs already settled; a
    stop asked for while an earlier group trained stops this one before it starts."""
    if stop_requested():
        return [MemberResult(RunResult(), RunStopped("stopped before training on request; the same command "
                                                     "resumes it")) for _ in group]
    try:
        return fit_group(
            [run_specs[i] for i in group], [models[i] for i in group], data,
            callbacks=[[opened[i].timed.log_epoch, *_member_callbacks(run_specs[i], models[i], data,
                                                                      opened[i].tracked, epoch_callbacks, i)]
                       for i in group],
            resumes=[opened[i].prior for i in group], save_states=[opened[i].save for i in group],
            show_progress=show_progress)
    except Exception as err:
        return [MemberResult(RunResult(), err) for _ in group]


def _member_callbacks(run_spec: RunSpec, model, data: ImageData, tracked: TrackedRun,
                      epoch_callbacks: list[list[EpochCallback]] | None, i: int) -> list[EpochCallback]:
    return [_epoch_figures(run_spec, model, data, tracked), *(epoch_callbacks[i] if epoch_callbacks else [])]


def _settle(tracker: Tracker, run_spec: RunSpec, experiment: str, model, data: ImageData, member,
            opened: _Opened, show_progress: bool) -> RunOutcome | BaseException:
    """End a trained member's MLflow run: finished with its test metrics, figures and
    checkpoint, or with the error that ended it. A stopped run keeps its resume state.
    A member whose lease is lost (a sweep's fencing) at any point here writes nothing more:
    its sampler stops, its state goes, and the LeaseLost is its outcome alone."""
    try:
        return _settle_member(tracker, run_spec, experiment, model, data, member, opened, show_progress)
    except LeaseLost as err:
        opened.tracked.stop_system_metrics()
        clear_state(opened.folder)
        return err


def _settle_member(tracker: Tracker, run_spec: RunSpec, experiment: str, model, data: ImageData, member,
                   opened: _Opened, show_progress: bool) -> RunOutcome | BaseException:
    tracked = opened.tracked
    if isinstance(member.error, LeaseLost):
        raise member.error
    if member.result.notes:
        tracked.set_tags({"vaelab.notes": "; ".join(member.result.notes)})
    if isinstance(member.error, KeyboardInterrupt):  # stopped on request: resumable from its saved state
        tracker.end_run(tracked, member.error)
        return member.error
    try:
        if member.error is not None:
            raise member.error
        outcome = _finish(run_spec, experiment, model, data, member.result, tracked, opened.timed.seconds,
                          show_progress)
        tracker.end_run(tracked)
    except LeaseLost:
        raise
    except Exception as err:  # this run fails alone
        tracker.end_run(tracked, err)
        clear_state(opened.folder)
        return err
    clear_state(opened.folder)
    return outcome
