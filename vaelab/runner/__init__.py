"""A run: spec -> data + model -> fit -> evaluate -> figures -> checkpoint, all written to one
run log (`vaelab.runlog.RunLog`: an MLflow run, or memory). `vaelab train` calls `run`, and
sweeps hand each of their run specs (or a stack of them) to the same `run_group`.

- `group`: the stages, and the entry points `run`, `run_stack`, `run_group`
- `start`: a member's run log opened or reopened from its resume state, the state folder held
- `finish`: a trained member's test metrics, figures, checkpoint and timings
- `model_record`: the kept weights as a model record (MLflow's LoggedModel)
- `figures`: the figures a run writes
- `outcome`: `RunOutcome`, folder names, run names
"""

from vaelab.runner.figures import COMPARED_FIGURES, write_figures
from vaelab.runner.group import run, run_group, run_stack
from vaelab.runner.outcome import CHECKPOINT_DIR, FIGURES_DIR, RunOutcome, run_name
from vaelab.runner.start import METRIC_NOTES, UNUSED_TAG, system_metrics_wanted

__all__ = ["COMPARED_FIGURES", "write_figures", "run", "run_group", "run_stack", "CHECKPOINT_DIR", "FIGURES_DIR",
           "RunOutcome", "run_name", "METRIC_NOTES", "UNUSED_TAG", "system_metrics_wanted"]
