"""Checkpoints kept while a run trains (`train.keep_every`, `train.keep_best`), as an epoch callback:
each kept epoch a checkpoint folder like the final one (it loads with `vaelab sample` and `vaelab.load`),
written to the run log as a model of its own at that step (an MLflow LoggedModel named epoch-NNNN;
`--no-track`: the run's kept/epoch-NNNN/ folder). Best-K models that drop out of the K best are deleted,
files and record.

A resumed run finds the models an earlier process kept (the run log lists them) and does not upload an
epoch twice: the epochs it trains again give the same weights. (A rollback, nan_policy: retry, goes back
to the epoch before the non-finite one, and a non-finite epoch is never kept.)"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from vaelab import progress
from vaelab.checkpoint import save_checkpoint
from vaelab.data import ImageData
from vaelab.kept import KeepRule, describe
from vaelab.runlog import kept_name
from vaelab.runner.start import Opened
from vaelab.spec import RunSpec
from vaelab.training import EpochCallback

VAL_LOSS_TAG = "vaelab.val_loss"  # on a kept model: the val/loss that ranked it


def checkpoint_mb(model) -> float:
    """What one checkpoint of `model` takes on disk: its state dict in float32 (the JSON beside it is KBs)."""
    return sum(t.numel() * 4 for t in model.state_dict().values()) / 1e6


class KeptCheckpoints:
    """The epoch callback that keeps checkpoints by a `KeepRule`."""

    def __init__(self, rule: KeepRule, run_spec: RunSpec, model, data: ImageData, opened: Opened):
        self.rule, self.run_spec, self.model, self.opened = rule, run_spec, model, opened
        self.classes = data.class_names
        # resume.state_dir holds a run's state in <root>/<experiment>/<run hash>: the spec name its folder gets.
        self.experiment = opened.folder.parent.name
        prior = opened.prior
        self.val = {e: h["val/loss"] for e, h in enumerate(prior.history, 1)} if prior is not None else {}
        started = time.perf_counter()
        self.kept = opened.log.kept_models()
        opened.timed.seconds += time.perf_counter() - started
        self.on = True

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        if not self.on:
            return
        started = time.perf_counter()
        log = self.opened.log
        self.val[epoch] = metrics["val/loss"]
        wanted = self.rule.wanted(self.val)
        if epoch in wanted and epoch not in self.kept:
            self._keep(epoch, metrics)
        for e in [e for e in self.kept if e <= epoch and e not in wanted]:  # later ones: an earlier process's
            log.drop_model(self.kept.pop(e))
        self.opened.timed.seconds += time.perf_counter() - started

    def _keep(self, epoch: int, metrics: dict[str, float]) -> None:
        run, log = self.run_spec, self.opened.log
        with tempfile.TemporaryDirectory(prefix="vaelab-kept-") as tmp:
            folder = save_checkpoint(Path(tmp) / kept_name(epoch), self.model, run, self.experiment, metrics,
                                     run_id=log.run_id, classes=self.classes, epoch=epoch)
            model_id = log.keep_model(folder, epoch,
                                      params={"arch": run.model.arch, "z_dim": run.model.z_dim,
                                              "likelihood": run.loss.likelihood, "run_hash": self.opened.run_hash,
                                              "epoch": epoch},
                                      tags={VAL_LOSS_TAG: f"{metrics['val/loss']:.6g}"})
        if model_id is None:  # the store keeps no models (it said so once): nothing more is tried
            self.on = False
            return
        self.kept[epoch] = model_id


def kept_checkpoints(run_spec: RunSpec, model, data: ImageData, opened: Opened,
                     show_progress: bool = False) -> list[EpochCallback]:
    """The run's keep-checkpoints callback (none when it keeps none), its disk cost said once."""
    rule = KeepRule.of(run_spec)
    if not rule:
        return []
    keeper = KeptCheckpoints(rule, run_spec, model, data, opened)
    if show_progress:
        line = describe(run_spec, checkpoint_mb(model))
        already = f" ({len(keeper.kept)} kept before it resumed)" if keeper.kept else ""
        progress.say(f"{line}{already}")
    return [keeper]
