"""A trained model to use: `vaelab.load(target)` from Python, and `vaelab sample / reconstruct / encode`
on the command line, through the same object.

    import vaelab
    model = vaelab.load("runs:/<run id>")          # or a checkpoint folder, models:/..., a bare run id
    mu, logvar = model.encode(images)              # (N, C, H, W) floats in [0, 1], uint8, or image files
    images = model.decode(mu)                      # decoder means
    grid = model.sample(16, label="Sneaker")       # a conditional model takes a class name or index
    model.run_spec, model.classes                  # what was trained, and the labels' names

A target is a checkpoint folder (a run's `checkpoint/`, a kept `kept/epoch-NNNN/`), a `models:/NAME/VERSION`
or `models:/MODEL_ID` URI, a `runs:/RUN_ID` URI or a bare MLflow run id (the run's final checkpoint), read from
the tracking store (a `tracking.Store`: reading makes none). Weights are loaded weights-only
(`vaelab.checkpoint`). Results come back on the CPU."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaelab.checkpoint import Checkpoint, load_checkpoint
from vaelab.errors import CheckpointError, UsageError
from vaelab.registry import image_shape
from vaelab.spec import RunSpec

RUN_ID = re.compile(r"[0-9a-f]{32}")  # what MLflow (and --no-track) name runs by
BATCH = 256  # images per forward pass when encoding many

Label = int | str
Images = torch.Tensor | np.ndarray | str | Path | Sequence[str | Path]


def checkpoint_folder(target: str, tracking_uri: str | None, scratch: Path) -> Path:
    """The checkpoint folder `target` names: itself, or downloaded from the tracking store into `scratch`."""
    if Path(target).is_dir():
        return Path(target)
    if target.startswith(("models:/", "runs:/")):
        uri = target
    elif RUN_ID.fullmatch(target):
        uri = f"runs:/{target}"  # the run's final checkpoint, as `vaelab evaluate RUN_ID` reads it
    else:
        raise CheckpointError(f"{target}: not a checkpoint folder, a models:/ or runs:/ URI, or an MLflow run id")
    from vaelab.tracking import Store

    return Store(tracking_uri).model_folder(uri, scratch)  # a Store reads: a store that is not there is not made


def load(target: str | Path, tracking_uri: str | None = None, device: str = "cpu") -> LoadedModel:
    """The model `target` names (see the module's docstring), on `device` ("cpu", "cuda" or "auto")."""
    from vaelab.training import resolve_device

    torch_device = resolve_device(device)
    with tempfile.TemporaryDirectory(prefix="vaelab-model-") as scratch:
        checkpoint = load_checkpoint(checkpoint_folder(str(target), tracking_uri, Path(scratch)), device=torch_device)
    return LoadedModel(checkpoint, torch_device)


class LoadedModel:
    """A checkpoint's VAE with what a user calls on it; every method runs without gradients, in eval mode."""

    def __init__(self, checkpoint: Checkpoint, device: torch.device):
        self.checkpoint, self.device = checkpoint, device
        self.model = checkpoint.model.to(device).eval()
        self.likelihood = checkpoint.likelihood

    # ---- what it is ------------------------------------------------------------------------------------
    @property
    def run_spec(self) -> RunSpec:
        return self.checkpoint.run_spec

    @property
    def name(self) -> str:
        return self.checkpoint.name

    @property
    def run_id(self) -> str | None:
        return self.checkpoint.run_id

    @property
    def epoch(self) -> int | None:
        """The epoch of a kept checkpoint; None for a run's final (best) weights."""
        return self.checkpoint.epoch

    @property
    def z_dim(self) -> int:
        return self.model.z_dim

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return image_shape(self.run_spec.data)

    @property
    def conditional(self) -> bool:
        return bool(self.model.num_classes)

    @property
    def classes(self) -> tuple[str, ...]:
        """The labels' names by index: as the checkpoint records them, else the indices as text for a conditional
        model (checkpoints written before names were recorded), else ()."""
        if self.checkpoint.classes:
            return self.checkpoint.classes
        return tuple(str(i) for i in range(self.model.num_classes))

    def describe_classes(self, limit: int = 30) -> str:
        named = [f"{i}={name}" if name != str(i) else name for i, name in enumerate(self.classes)]
        return ", ".join(named[:limit]) + (f", ... ({len(named)} in all)" if len(named) > limit else "")

    # ---- labels and images in ------------------------------------------------------------------------------
    def label_index(self, label: Label, what: str = "label") -> int:
        """A class name or index as an index; UsageError (naming `what` and the classes) for anything else."""
        if not self.conditional and not self.classes:
            raise UsageError(f"{what}: this model has no classes")
        classes = self.classes
        if isinstance(label, str) and label in classes:
            return classes.index(label)
        text = str(label).strip()
        if not isinstance(label, bool) and (isinstance(label, int) or text.lstrip("-").isdigit()):
            index = int(text)
            if 0 <= index < len(classes):
                return index
        raise UsageError(f"{what}: expected a class name or index 0..{len(classes) - 1}, got {label!r}; classes: "
                         f"{self.describe_classes()}")

    def labels(self, label: Label | Sequence[Label] | torch.Tensor | np.ndarray | None, n: int,
               what: str = "label") -> torch.Tensor | None:
        """`n` labels on the model's device: one label for all, or one per image; None for an unconditional model.
        A conditional model must be told (its code depends on the label): UsageError listing the classes."""
        if not self.conditional:
            if label is not None:
                raise UsageError(f"{what}: this model is not conditional (model.conditional=false); leave it out")
            return None
        if label is None:
            raise UsageError(f"{what}: this conditional model needs a label (a class name or index): "
                             f"{self.describe_classes()}")
        if isinstance(label, int | str):
            return torch.full((n,), self.label_index(label, what), dtype=torch.long, device=self.device)
        values = label.tolist() if isinstance(label, torch.Tensor | np.ndarray) else list(label)
        if len(values) != n:
            raise UsageError(f"{what}: {len(values)} labels for {n} images")
        return torch.tensor([self.label_index(v, what) for v in values], dtype=torch.long, device=self.device)

    def images(self, images: Images) -> torch.Tensor:
        """A float batch (N, C, H, W) in [0, 1] on the device: from a tensor or array (uint8 is scaled, a single
        image gets a batch axis), or image files (cropped and resized as training data was)."""
        if isinstance(images, str | Path) or (isinstance(images, Sequence) and not isinstance(images, np.ndarray)):
            from vaelab.data.images import load_image

            paths = [images] if isinstance(images, str | Path) else list(images)
            return torch.cat([load_image(p, self.image_shape) for p in paths]).to(self.device)
        x = torch.as_tensor(images)
        x = x.unsqueeze(0) if x.dim() == 3 else x
        if tuple(x.shape[1:]) != self.image_shape or x.dim() != 4:
            raise UsageError(f"images: expected shape (N, {', '.join(map(str, self.image_shape))}) for this model, "
                             f"got {tuple(x.shape)}")
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return x.to(self.device)

    # ---- what it does --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, images: Images, label: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's means and log-variances, (N, z_dim) each."""
        x = self.images(images)
        y = self.labels(label, len(x))
        mus, logvars = [], []
        for start in range(0, len(x), BATCH):
            mu, logvar = self.model.encode(x[start:start + BATCH], None if y is None else y[start:start + BATCH])
            mus.append(mu.float().cpu())
            logvars.append(logvar.float().cpu())
        return torch.cat(mus), torch.cat(logvars)

    @torch.inference_mode()
    def decode(self, z: torch.Tensor | np.ndarray, label: Any = None) -> torch.Tensor:
        """The decoder's means for codes `z` (N, z_dim): images (N, C, H, W)."""
        z = torch.as_tensor(z, dtype=torch.float32, device=self.device)
        if z.dim() != 2 or z.shape[1] != self.z_dim:
            raise UsageError(f"z: expected shape (N, {self.z_dim}) for this model, got {tuple(z.shape)}")
        y = self.labels(label, len(z))
        return self.likelihood.mean(self.model.decode(z, y)).float().cpu()

    @torch.inference_mode()
    def sample(self, n: int, label: Label | None = None, seed: int = 0) -> torch.Tensor:
        """`n` decoded draws from the model's prior (model.prior), seeded; a conditional model without a label
        cycles its classes."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        z = self.model.sample_codes(n, generator, self.device)
        y = None if label is None else self.labels(label, n)
        return self.likelihood.mean(self.model.decode(z, y)).float().cpu()

    @torch.inference_mode()
    def reconstruct(self, images: Images, label: Any = None) -> torch.Tensor:
        """Each image decoded from its posterior mean."""
        x = self.images(images)
        y = self.labels(label, len(x))
        return self.likelihood.mean(self.model.decode(self.model.encode(x, y)[0], y)).float().cpu()

    def __repr__(self) -> str:
        spec = self.run_spec
        what = f"{spec.model.arch}, z_dim={self.z_dim}, {spec.loss.likelihood}" + \
            (f", conditional on {len(self.classes)} classes" if self.conditional else "")
        at = f", epoch {self.epoch}" if self.epoch else ""
        return f"<vaelab model {self.name!r} ({what}) of run {self.run_id}{at}>"
