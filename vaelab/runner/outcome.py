"""What a finished run hands back (`RunOutcome`), its folders' names, and the name a run gets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vaelab.runlog import local_path
from vaelab.spec import RunSpec

CHECKPOINT_DIR = "checkpoint"
FIGURES_DIR = "figures"


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
