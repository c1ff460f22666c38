"""Checkpoint folders: model.pt (state dict), spec.yaml (the resolved run, as a
spec file) and metrics.json. The folder alone rebuilds the model."""

from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from vaelab.atomic import atomic_torch_save, atomic_write
from vaelab.errors import CheckpointError
from vaelab.likelihoods import Likelihood
from vaelab.models import VAE
from vaelab.registry import build_model, image_shape
from vaelab.spec import RunSpec, SpecError, load_spec, run_to_yaml

MODEL_FILE, SPEC_FILE, METRICS_FILE, RUN_FILE = "model.pt", "spec.yaml", "metrics.json", "run.json"


@dataclass
class Checkpoint:
    model: VAE
    run_spec: RunSpec
    name: str
    likelihood: Likelihood
    metrics: dict
    run_id: str | None = None  # the MLflow run that wrote it (checkpoints from before 0.2 do not say)


def save_checkpoint(folder: Path, model: VAE, run_spec: RunSpec, name: str, metrics: dict,
                    run_id: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save(folder / MODEL_FILE, state)
    atomic_write(folder / SPEC_FILE, lambda p: p.write_text(run_to_yaml(run_spec, name)))
    atomic_write(folder / METRICS_FILE, lambda p: p.write_text(json.dumps(metrics, indent=2, sort_keys=True)))
    if run_id is not None:
        atomic_write(folder / RUN_FILE, lambda p: p.write_text(json.dumps({"run_id": run_id, "experiment": name})))
    return folder


def load_checkpoint(folder: str | Path, device: torch.device | str = "cpu") -> Checkpoint:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder (expected {MODEL_FILE}, {SPEC_FILE}, {METRICS_FILE})")
    missing = [f for f in (MODEL_FILE, SPEC_FILE) if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(f"{folder}: incomplete checkpoint, missing {', '.join(missing)}")
    try:
        spec = load_spec(folder / SPEC_FILE)
    except SpecError as err:
        raise CheckpointError(f"{folder / SPEC_FILE}: {err}") from None
    try:
        # weights_only: a checkpoint is tensors, never code to run.
        state = torch.load(folder / MODEL_FILE, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{folder / MODEL_FILE}: cannot load weights safely ({first_line})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{folder / MODEL_FILE}: not a state dict of tensors")
    # Checkpoints written before conditional models existed have no class count: unconditional.
    state.setdefault("n_classes", torch.tensor(0))
    n_classes = int(state["n_classes"])
    model = build_model(spec.base, image_shape(spec.base.data), n_classes or None).to(device)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        detail = str(err).splitlines()[0]
        raise CheckpointError(f"{folder / MODEL_FILE}: weights do not match {SPEC_FILE} ({detail})") from None
    metrics_path = folder / METRICS_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    run_path = folder / RUN_FILE
    run_id = json.loads(run_path.read_text()).get("run_id") if run_path.is_file() else None
    model.eval()
    return Checkpoint(model=model, run_spec=spec.base, name=spec.name, likelihood=model.likelihood,
                      metrics=metrics, run_id=run_id)
