"""fit(): the training loop. Adam, early stopping on val/loss with the best
weights restored, a guard against non-finite losses, and seeded reproducibility.

This module never imports mlflow or optuna: tracking and pruning plug in as
epoch callbacks, so the core runs and tests without them.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from vaelab.data import ImageData, batch_indices
from vaelab.data.augment import augment_batch
from vaelab.evaluate import split_terms
from vaelab.likelihoods import Likelihood
from vaelab.models import VAE
from vaelab.objectives import KLWeighting, kl_weighting
from vaelab.registry import build_model
from vaelab.resume import TrainState
from vaelab.step import StepTerms

# Called after each epoch with (epoch starting at 1, {"train/loss": ..., "val/loss": ...}).
EpochCallback = Callable[[int, dict[str, float]], None]


class NonFiniteLossError(RuntimeError):
    """Training produced NaN or inf; the message is the failure reason."""


class StopRequested(KeyboardInterrupt):
    """The run stopped cleanly between epochs because the user asked (Ctrl-C)."""


_stop = threading.Event()
_training = threading.Event()


def request_stop() -> bool:
    """Ask the running fit() to stop after its current epoch (a first Ctrl-C).
    False if no training is under way, or a stop was already asked for."""
    if not _training.is_set() or _stop.is_set():
        return False
    _stop.set()
    return True


class RunPruned(Exception):
    """Raised by an epoch callback to stop a run early on purpose (a pruner's
    decision); trackers record it as KILLED rather than FAILED."""

    run_status = "KILLED"


@dataclass
class RunResult:
    history: list[dict[str, float]] = field(default_factory=list)  # one dict per epoch
    best_epoch: int = 0
    best_val_loss: float = math.inf
    stopped_early: bool = False
    stale: int = 0  # epochs since val/loss last improved
    notes: list[str] = field(default_factory=list)  # resumed, rolled back: said on the MLflow run

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    def observe(self, epoch: int, metrics: dict[str, float], patience: int | None) -> bool:
        """Record an epoch; True if its val/loss is the best so far (keep its weights).
        Sets stopped_early once `patience` epochs have passed without improvement."""
        self.history.append(metrics)
        if metrics["val/loss"] < self.best_val_loss:
            self.best_val_loss, self.best_epoch, self.stale = metrics["val/loss"], epoch, 0
            return True
        self.stale += 1
        self.stopped_early = patience is not None and self.stale >= patience
        return False


def non_finite_reason(metrics: dict[str, float], epoch: int) -> str | None:
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    return f"non-finite {', '.join(bad)} at epoch {epoch}" if bad else None


def train_metrics(weighting: KLWeighting, epoch: int, n_batches: int, loss: float, recon: float,
                  kl: float) -> dict[str, float]:
    """An epoch's train/* metrics from its mean terms, with the KL schedule's value in its last step."""
    metrics = {"train/loss": loss, "train/recon": recon, "train/kl": kl, "train/elbo": recon + kl}
    last_step = epoch - 1 / n_batches
    if weighting.schedule == "capacity":
        metrics["train/capacity"] = weighting.capacity(last_step)
    else:
        metrics["train/kl_weight"] = weighting.weight(last_step)
    return metrics


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def init_model(run_spec, shape: tuple[int, int, int], device: torch.device) -> VAE:
    """Build the spec's model with weights seeded by train.seed."""
    torch.manual_seed(run_spec.train.seed)
    return build_model(run_spec, shape).to(device)


@contextmanager
def denormals_flushed() -> Iterator[None]:
    """Treat subnormal floats as zero on CPU while training. Far in the tails, the
    Bernoulli loss's exp(-|logit|) and Adam's second moments underflow into
    subnormals, and on x86 each op that touches one is several times slower
    (measured: the elementwise half of a step 2-4x); values below 1e-38 change no
    loss a VAE reports. The setting is per process, so it is undone afterwards."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


@contextmanager
def _training_session() -> Iterator[None]:
    """While fit() trains: request_stop() applies to it, and subnormals are flushed."""
    _stop.clear()
    _training.set()
    try:
        with denormals_flushed():
            yield
    finally:
        _training.clear()


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adam, fused into one kernel per step where the parameters allow it (CPU and
    CUDA floats): for a small MLP the unfused update costs as much as a matmul."""
    params = list(model.parameters())
    fusable = all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fusable or None)


def _train_epoch(model, optimizer, data: ImageData, step_terms: StepTerms, weighting: KLWeighting, epoch: int,
                 batch_size, batch_gen, noise_gen, bar):
    sums = torch.zeros(3, device=data.train.x.device)
    n_batches = math.ceil(len(data.train) / batch_size)
    for step, idx in enumerate(batch_indices(len(data.train), batch_size, batch_gen, data.train.x.device)):
        x = data.train.x[idx]
        if data.augment:
            x = augment_batch(x, noise_gen)
        if data.dynamic_binarize:  # a fresh binary sample of each image every time it is seen
            x = torch.bernoulli(x, generator=noise_gen)
        noise = torch.randn((len(x), model.z_dim), generator=noise_gen, device=x.device)
        recon, kl_dims = step_terms(x, data.train.y[idx], noise)
        progress = epoch - 1 + step / n_batches  # in epochs at the start of the step, for the KL schedule
        kl = kl_dims.sum(1)
        optimizer.zero_grad(set_to_none=True)
        weighting.objective(recon, kl_dims, progress).backward()
        optimizer.step()
        # Accumulate on the device: no host sync per step.
        loss = weighting.per_example(recon, kl, progress)
        sums += torch.stack([loss.sum(), recon.sum(), kl.sum()]).detach()
        bar.update(1)
    return train_metrics(weighting, epoch, n_batches, *(sums / len(data.train)).tolist())


def _snapshot(epoch: int, model, optimizer, batch_gen, noise_gen, result: RunResult, best_state,
              retried: bool) -> TrainState:
    """A copy of everything the next epoch depends on (the live tensors keep changing)."""
    return TrainState(
        epoch=epoch, model=copy.deepcopy(model.state_dict()), optimizer=copy.deepcopy(optimizer.state_dict()),
        batch_gen=batch_gen.get_state(), noise_gen=noise_gen.get_state(), history=list(result.history),
        best_epoch=result.best_epoch, best_val_loss=result.best_val_loss, best_state=best_state,
        stale=result.stale, retried=retried)


def _restore(state: TrainState, model, optimizer, batch_gen, noise_gen, result: RunResult) -> dict:
    """Put everything back as it was after `state.epoch`; returns the best weights so far."""
    model.load_state_dict(state.model)
    optimizer.load_state_dict(state.optimizer)  # its lr too, lowered if a retry happened
    batch_gen.set_state(state.batch_gen)
    noise_gen.set_state(state.noise_gen)
    result.history = list(state.history)
    result.best_epoch, result.best_val_loss, result.stale = state.best_epoch, state.best_val_loss, state.stale
    return copy.deepcopy(state.best_state)


def fit(
    run_spec,
    model: VAE,
    data: ImageData,
    callbacks: list[EpochCallback] | None = None,
    show_progress: bool = True,
    likelihood: Likelihood | None = None,
    resume: TrainState | None = None,
    save_state: Callable[[TrainState], None] | None = None,
) -> RunResult:
    """Train `model` in place; on return it holds the weights of the best epoch.

    `resume` continues from a saved state (the epochs after it replay exactly as an
    uninterrupted run would have them); `save_state` receives the state after every
    train.checkpoint_every epochs. With train.nan_policy: retry, a non-finite epoch
    rolls back once to the last good epoch and goes on at a tenth of the learning rate.
    A request_stop() ends the run after the current epoch (its state saved) with
    StopRequested, a KeyboardInterrupt."""
    train = run_spec.train
    likelihood = likelihood or model.likelihood
    device = data.train.x.device
    optimizer = make_optimizer(model, train.lr)
    step_terms = StepTerms(model, likelihood, bf16=train.precision == "bf16", compile=train.compile)
    weighting = kl_weighting(run_spec)
    batch_gen = torch.Generator().manual_seed(train.seed)
    noise_gen = torch.Generator(device=device).manual_seed(train.seed)
    val_gen_seed = train.seed + 2  # validation noise: the same draws every epoch
    n_batches = math.ceil(len(data.train) / train.batch_size)
    result = RunResult()
    best_state = copy.deepcopy(model.state_dict())
    retried, epoch = False, 1
    if resume is not None:
        best_state = _restore(resume, model, optimizer, batch_gen, noise_gen, result)
        retried, epoch = resume.retried, resume.epoch + 1
        result.notes.append(f"resumed after epoch {resume.epoch}")
    retry_on_nan = train.nan_policy == "retry"
    saving = save_state is not None and train.checkpoint_every > 0
    last_good = resume  # the rollback point of nan_policy: retry
    if last_good is None and retry_on_nan:
        last_good = _snapshot(0, model, optimizer, batch_gen, noise_gen, result, best_state, retried)
    with _training_session():
        while epoch <= train.epochs:
            model.train()
            with tqdm(total=n_batches, desc=f"epoch {epoch}/{train.epochs}", unit="batch",
                      disable=not show_progress, leave=True, dynamic_ncols=True) as bar:
                started = time.perf_counter()
                metrics = _train_epoch(model, optimizer, data, step_terms, weighting, epoch, train.batch_size,
                                       batch_gen, noise_gen, bar)
                metrics["time/epoch_s"] = time.perf_counter() - started
                val_gen = torch.Generator(device=device).manual_seed(val_gen_seed)
                val = split_terms(model, data.val, likelihood, weighting, run_spec.eval.batch_size, val_gen)
                metrics.update({f"val/{k}": v for k, v in val.items()})
                bar.set_postfix({k: f"{metrics[k]:.2f}" for k in ("train/loss", "val/loss")})
            reason = non_finite_reason(metrics, epoch)
            if reason and retry_on_nan and not retried:
                old_lr = optimizer.param_groups[0]["lr"]
                best_state = _restore(last_good, model, optimizer, batch_gen, noise_gen, result)
                for group in optimizer.param_groups:
                    group["lr"] = old_lr / 10
                retried, epoch = True, last_good.epoch + 1
                result.notes.append(f"{reason}: rolled back to epoch {last_good.epoch}, "
                                    f"train.lr {old_lr:g} -> {old_lr / 10:g}")
                continue
            if reason:
                raise NonFiniteLossError(f"{reason} (try a lower train.lr"
                                         f"{'' if retry_on_nan else ', or train.nan_policy: retry'})")
            if result.observe(epoch, metrics, train.patience):
                best_state = copy.deepcopy(model.state_dict())
            for callback in callbacks or []:
                callback(epoch, metrics)
            if result.stopped_early:
                break
            save_now = saving and epoch % train.checkpoint_every == 0
            if retry_on_nan or save_now:
                last_good = _snapshot(epoch, model, optimizer, batch_gen, noise_gen, result, best_state, retried)
            if save_now:
                save_state(last_good)
            if _stop.is_set() and epoch < train.epochs:
                raise StopRequested(f"stopped after epoch {epoch} on request; the same command resumes it")
            epoch += 1
    model.load_state_dict(best_state)
    return result
