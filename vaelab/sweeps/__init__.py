"""Sweeps on Optuna studies.

- storage: where a study lives (open_storage, study_dir, SweepError)
- queue: the trial queue, the only code that touches Optuna's internals
- trials: runs claimed trials (runner.run / runner.run_stack)
- fingerprint: the spec a study was made from
- coordinator: Sweep, which ties them together
- commands: `vaelab sweep` and `vaelab worker`
- slurm, slurm_task, status: `vaelab sweep --slurm` (a job array), a worker inside a Slurm task
  (warning, preemption, requeue), `vaelab status`
"""

from __future__ import annotations

from typing import Any

from vaelab.sweeps.storage import STUDIES_DIR, SweepError, open_storage, study_dir

__all__ = ["STUDIES_DIR", "Sweep", "SweepError", "open_storage", "study_dir"]


def __getattr__(name: str) -> Any:
    """`Sweep` on first use: importing it imports training (torch); storage and errors do not."""
    if name == "Sweep":
        from vaelab.sweeps.coordinator import Sweep

        return Sweep
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
