"""What training records per run: the history, the best epoch, early stopping."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from vaelab.objectives import KLWeighting


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

    def early_stop_line(self, epoch: int, patience: int | None) -> str:
        """What a console says when early stopping ends a run after `epoch`."""
        epochs = f"{self.stale} epoch" + ("s" if self.stale != 1 else "")
        return (f"early stopping after epoch {epoch}: val/loss has not improved for {epochs} "
                f"(train.patience {patience}); keeping epoch {self.best_epoch} (val/loss {self.best_val_loss:.2f})")


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
