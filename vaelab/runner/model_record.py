"""The run's kept weights as a model record in its log (MLflow's LoggedModel): started before the
test metrics, which are linked to it; READY with the checkpoint folder once uploaded; FAILED if the
run fails first, so no record is left PENDING (a resumed run makes a new one). A log without such
records (an MLflow 2 server) still gets every metric, unlinked."""

from __future__ import annotations

from pathlib import Path

from vaelab.runlog import RunLog
from vaelab.spec import RunSpec


class ModelRecord:
    def __init__(self, log: RunLog, run_spec: RunSpec, step: int):
        self.log, self.step = log, step
        self.model_id = log.try_start_model({"arch": run_spec.model.arch, "z_dim": run_spec.model.z_dim,
                                             "likelihood": run_spec.loss.likelihood, "run_hash": run_spec.hash()})
        self.ready = False

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """The test metrics linked to the model (where there is one); the rest to the run alone."""
        test = {k: v for k, v in metrics.items() if k.startswith("test/")} if self.model_id else {}
        if self.model_id:
            self.log.log_model_metrics(self.model_id, test, step=self.step)
        self.log.log_metrics({k: v for k, v in metrics.items() if k not in test}, step=self.step)

    def finish(self, folder: Path) -> None:
        """The checkpoint folder into the model, READY."""
        if self.model_id:
            self.log.finish_model(self.model_id, folder, step=self.step)
            self.ready = True

    def abandon(self) -> None:
        """FAILED, unless it was finished: the run failed before its weights were uploaded."""
        if self.model_id and not self.ready:
            self.log.finish_model(self.model_id, None, step=self.step)
