"""One run inside the training loop: its generators, KL weighting, history, best
weights, NaN and early-stopping policy and resume state. A single run is a group of
one member; a stacked run is a group of several (vaelab.training.stacked). The
policies live here once, so both kinds of run behave the same."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from vaelab.errors import NonFiniteLossError, RunStopped
from vaelab.objectives import KLWeighting, kl_weighting
from vaelab.resume import TrainState
from vaelab.spec import RunSpec
from vaelab.training.result import RunResult, non_finite_reason
from vaelab.training.session import recording_epoch

# Called after each epoch with (epoch starting at 1, {"train/loss": ..., "val/loss": ...}).
EpochCallback = Callable[[int, dict[str, float]], None]

# Validation noise is drawn from seed + 2 afresh every epoch, so epochs compare on the same draws
# (seed itself orders batches, seed + 1 is the test evaluation's).
VALIDATION_SEED_OFFSET = 2


class Stepper(Protocol):
    """What the loop needs of the thing that trains its members' weights."""

    def weights(self, i: int) -> dict[str, torch.Tensor]: ...

    def optimizer_state(self, i: int) -> dict: ...

    def aux_state(self, i: int) -> dict: ...


@dataclass
class Member:
    run: RunSpec
    device: torch.device
    callbacks: list[EpochCallback] = field(default_factory=list)
    save_state: Callable[[TrainState], None] | None = None
    resume: TrainState | None = None
    notes: list[str] = field(default_factory=list)
    announce_resume: bool = True  # False for a rollback, which says so itself
    error: BaseException | None = None
    rollback: TrainState | None = None  # nan_policy: retry asked to go on from this state
    done: bool = False

    def __post_init__(self) -> None:
        train = self.run.train
        self.weighting: KLWeighting = kl_weighting(self.run)
        self.batch_gen = torch.Generator().manual_seed(train.seed)
        self.noise_gen = torch.Generator(device=self.device).manual_seed(train.seed)
        self.result = RunResult(notes=list(self.notes))
        self.retried = False
        self.last_good: TrainState | None = None
        self.best_state: dict = {}

    # ---- start ---------------------------------------------------------------------------------
    @property
    def start_epoch(self) -> int:
        return 1 if self.resume is None else self.resume.epoch + 1

    @property
    def retry_on_nan(self) -> bool:
        return self.run.train.nan_policy == "retry"

    def restore(self, model: torch.nn.Module) -> dict | None:
        """Put the model and this member back as they were after the resume state's
        epoch; returns the optimiser state to load (None for a fresh start)."""
        state = self.resume
        if state is None:
            self.best_state = copy.deepcopy(model.state_dict())
            return None
        model.load_state_dict(state.model)
        if self.announce_resume:
            self.result.notes.append(f"resumed after epoch {state.epoch}")
        self.batch_gen.set_state(state.batch_gen)
        self.noise_gen.set_state(state.noise_gen)
        self.result.history = list(state.history)
        self.result.best_epoch, self.result.best_val_loss = state.best_epoch, state.best_val_loss
        self.result.stale, self.retried = state.stale, state.retried
        self.best_state = copy.deepcopy(state.best_state)
        return state.optimizer

    def begin(self, stepper: Stepper, i: int) -> None:
        """The rollback point of nan_policy: retry, before the first epoch."""
        if self.resume is not None:
            self.last_good = self.resume
        elif self.retry_on_nan:
            self.last_good = self.snapshot(0, stepper, i)

    def validation_generator(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.run.train.seed + VALIDATION_SEED_OFFSET)

    # ---- end of an epoch ---------------------------------------------------------------------------
    def end_epoch(self, epoch: int, metrics: dict[str, float], stepper: Stepper, i: int) -> None:
        """Non-finite check (fail, or ask for a rollback), early stopping and best
        weights, callbacks (one that raises ends this member only), resume state; said to be
        recording all the while (session.recording_epoch)."""
        with recording_epoch():
            self._end_epoch(epoch, metrics, stepper, i)

    def _end_epoch(self, epoch: int, metrics: dict[str, float], stepper: Stepper, i: int) -> None:
        train = self.run.train
        reason = non_finite_reason(metrics, epoch)
        if reason and self.retry_on_nan and not self.retried and self.last_good is not None:
            self.rollback, self.done = self._rolled_back(reason), True
            return
        if reason:
            hint = "" if self.retry_on_nan else ", or train.nan_policy: retry"
            self._end(NonFiniteLossError(f"{reason} (try a lower train.lr{hint})"))
            return
        if self.result.observe(epoch, metrics, train.patience):
            self.best_state = stepper.weights(i)
        try:
            for callback in self.callbacks:
                callback(epoch, metrics)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # a pruner's decision, a store that refused a write: this member ends
            self._end(err)
            return
        if self.result.stopped_early:
            self.done = True
            return
        save_now = train.checkpoint_every > 0 and epoch % train.checkpoint_every == 0
        if self.retry_on_nan or (save_now and self.save_state is not None):
            self.last_good = self.snapshot(epoch, stepper, i)
        if save_now and self.save_state is not None and self.last_good is not None:
            self.save_state(self.last_good)
        self.done = epoch >= train.epochs

    def stop(self, epoch: int, stepper: Stepper | None = None, i: int = 0) -> None:
        """A stop was asked for (a first Ctrl-C) during `epoch`: the run ends here, KILLED, even
        when this was its last epoch, so a stop always means the same; the same command resumes
        it, and a run with no epoch left goes straight on to its evaluation. The state of this
        epoch is saved first where train.checkpoint_every did not save it (also when it is 0: a stop
        is when a resume state is needed; none when early stopping ended the run here: a resume
        replays the epoch and stops again)."""
        train = self.run.train
        unsaved = train.checkpoint_every == 0 or epoch % train.checkpoint_every != 0
        if stepper is not None and unsaved and self.save_state is not None and not self.result.stopped_early:
            self.last_good = self.snapshot(epoch, stepper, i)
            self.save_state(self.last_good)
        trained = epoch >= train.epochs or self.result.stopped_early
        then = "; the same command resumes it" + (" and goes on to the evaluation" if trained else "")
        self._end(RunStopped(f"stopped after epoch {epoch} of {train.epochs} on request{then}"))

    def _end(self, error: BaseException) -> None:
        self.error, self.done = error, True

    def snapshot(self, epoch: int, stepper: Stepper, i: int) -> TrainState:
        """A copy of everything the next epoch depends on (the live tensors keep changing)."""
        result = self.result
        return TrainState(
            epoch=epoch, model=stepper.weights(i), optimizer=stepper.optimizer_state(i),
            batch_gen=self.batch_gen.get_state(), noise_gen=self.noise_gen.get_state(),
            history=list(result.history), best_epoch=result.best_epoch, best_val_loss=result.best_val_loss,
            best_state=self.best_state, stale=result.stale, retried=self.retried, aux=stepper.aux_state(i))

    def _rolled_back(self, reason: str) -> TrainState:
        """The last good state at a tenth of its learning rate, with the one retry used up."""
        assert self.last_good is not None  # end_epoch asks for a rollback only when there is one
        state = copy.copy(self.last_good)
        state.optimizer = copy.deepcopy(state.optimizer)
        old_lr = state.optimizer["param_groups"][0]["lr"]
        for group in state.optimizer["param_groups"]:
            group["lr"] = old_lr / 10
        state.retried = True
        self.result.notes.append(f"{reason}: rolled back to epoch {state.epoch}, "
                                 f"train.lr {old_lr:g} -> {old_lr / 10:g}")
        return state
