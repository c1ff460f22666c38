"""Which epochs' weights a run keeps besides its final checkpoint (`train.keep_every`, `train.keep_best`),
and what that costs on disk. The rule is a function of the validation losses so far, so a resumed or
rolled-back run, asking it again, keeps the same epochs an uninterrupted one would. Imports no torch:
`vaelab train --dry-run` says the plan."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

FLOAT_BYTES = 4  # weights are saved in float32, whatever the training precision


@dataclass(frozen=True)
class KeepRule:
    every: int = 0  # every N-th epoch (0: none)
    best: int = 0  # the K epochs with the lowest val/loss so far (0: none)

    @classmethod
    def of(cls, run_spec: Any) -> KeepRule:
        return cls(run_spec.train.keep_every, run_spec.train.keep_best)

    def __bool__(self) -> bool:
        return bool(self.every or self.best)

    def wanted(self, val_losses: Mapping[int, float]) -> set[int]:
        """The epochs to hold now, given each epoch's val/loss so far: every N-th, and the K lowest (an
        earlier epoch first on a tie, as early stopping keeps the first best)."""
        every = {e for e in val_losses if self.every and e % self.every == 0}
        ranked = sorted(val_losses, key=lambda e: (val_losses[e], e))
        return every | set(ranked[: self.best])

    def most(self, epochs: int) -> int:
        """At most this many are held at once over a run of `epochs` (early stopping may leave fewer)."""
        every = epochs // self.every if self.every else 0
        return min(epochs, every + self.best)

    def words(self) -> str:
        parts = []
        if self.every:
            parts.append(f"every {self.every} epochs" if self.every > 1 else "every epoch")
        if self.best:
            parts.append(f"the best {self.best} by val/loss" if self.best > 1 else "the best by val/loss")
        return " and ".join(parts)


def describe(run_spec: Any, checkpoint_mb: float | None = None) -> str | None:
    """One line on what keeping checkpoints costs (None when the run keeps none). Without `checkpoint_mb`
    (a dry run builds no model) the size is said relative to the final checkpoint."""
    rule = KeepRule.of(run_spec)
    if not rule:
        return None
    most = rule.most(run_spec.train.epochs)
    if checkpoint_mb is None:
        size = f"each as large as the final checkpoint ({FLOAT_BYTES} bytes per weight; training says how many MB)"
    else:
        size = f"~{_mb(checkpoint_mb)} each, ~{_mb(most * checkpoint_mb)} at most for this run"
    return f"keeping a checkpoint {rule.words()}: up to {most} besides the final one, {size}"


def _mb(value: float) -> str:
    return f"{value:.2g} MB" if value < 10 else f"{value:,.0f} MB"


def plan_lines(run_spec: Any) -> list[str]:
    """`describe`'s line for `vaelab train --dry-run`, where no model is built: none when nothing is kept."""
    line = describe(run_spec)
    return [line] if line else []
