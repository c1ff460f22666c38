"""Checkpoint folders: model.pt (state dict), spec.yaml (the resolved run, as a
spec file), metrics.json and run.json (the MLflow run that wrote it, the digest of its
weights, the names of its labels, so a conditional model takes `--label Sneaker`, and
for a kept checkpoint its epoch; folders written before names were recorded take label
indices). The folder alone rebuilds the model. Nothing in it is trusted:
model.pt is loaded weights-only, the JSON files are checked field by field, and
weights that do not fit spec.yaml are named tensor by tensor."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vaelab.errors import CheckpointError
from vaelab.likelihoods import Likelihood
from vaelab.models import VAE
from vaelab.models.build import build_model
from vaelab.ops.atomic import atomic_torch_save, atomic_write
from vaelab.registry import image_shape
from vaelab.spec import RunSpec, SpecError, load_spec, run_to_yaml

MODEL_FILE, SPEC_FILE, METRICS_FILE, RUN_FILE = "model.pt", "spec.yaml", "metrics.json", "run.json"
MAX_CLASS_NAME = 1000  # characters of one class name: a label, not a document
DIGEST_KEY = "weights_sha256"  # in run.json; the run carries the same value as its DIGEST_TAG
DIGEST_TAG = "vaelab.checkpoint.sha256"  # set by runner through the tracking layer, read by `vaelab evaluate`
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass
class Checkpoint:
    model: VAE
    run_spec: RunSpec
    name: str
    likelihood: Likelihood
    metrics: dict
    run_id: str | None = None  # the MLflow run that wrote it (checkpoints from before 0.2 do not say)
    digest: str = ""  # weights_digest of model.pt's state dict, as loaded
    classes: tuple[str, ...] = ()  # the labels' names, by index (empty where the folder does not record them)
    epoch: int | None = None  # the epoch a kept checkpoint was taken at (None: the run's final, best weights)


@dataclass(frozen=True)
class RunRecord:
    """run.json: the MLflow run a checkpoint belongs to, and the digest of the weights it wrote."""

    run_id: str
    experiment: str | None = None
    digest: str | None = None  # absent in checkpoints written before digests were recorded
    epoch: int | None = None  # a kept checkpoint's epoch (train.keep_every / keep_best); None for the final one
    classes: tuple[str, ...] = ()  # the labels' names by index (the data's class names); () in older folders


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's tensors in key order (name, dtype, shape, bytes): the same
    weights give the same digest however the file was serialised or copied."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(folder: Path, model: VAE, run_spec: RunSpec, name: str, metrics: dict,
                    run_id: str | None = None, classes: tuple[str, ...] = (), epoch: int | None = None) -> Path:
    """The folder for `model`. With `run_id`, run.json: the run, the weights' digest, `classes` (the data's class
    names, by label index) and `epoch` (a kept checkpoint taken while training; the final one has none)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save(folder / MODEL_FILE, state)
    atomic_write(folder / SPEC_FILE, lambda p: p.write_text(run_to_yaml(run_spec, name)))
    atomic_write(folder / METRICS_FILE, lambda p: p.write_text(json.dumps(metrics, indent=2, sort_keys=True)))
    names = [str(c) for c in classes]
    if run_id is not None:
        record = {"run_id": run_id, "experiment": name, DIGEST_KEY: weights_digest(state),
                  # names that could not be told apart are left out: such labels stay indices, as in older folders
                  **({"classes": names} if names and _usable_names(names) else {}),
                  **({"epoch": epoch} if epoch is not None else {})}
        atomic_write(folder / RUN_FILE, lambda p: p.write_text(json.dumps(record, ensure_ascii=False)))
    return folder


def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or a one-line CheckpointError saying what it holds instead."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read it ({err.strerror or err})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {_json_kind(value)}")
    return value


def _json_kind(value: Any) -> str:
    kinds = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number",
             dict: "an object", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def read_run_record(folder: Path) -> RunRecord | None:
    """run.json of a checkpoint folder, checked; None if the folder has none."""
    path = folder / RUN_FILE
    if not path.is_file():
        return None
    raw = _json_object(path)
    run_id, experiment, digest, epoch = raw.get("run_id"), raw.get("experiment"), raw.get(DIGEST_KEY), raw.get("epoch")
    classes = raw.get("classes", [])
    if not isinstance(run_id, str) or not run_id.strip():
        raise CheckpointError(f"{path}: run_id: expected the MLflow run id as a string, got {_json_kind(run_id)}")
    if experiment is not None and not isinstance(experiment, str):
        raise CheckpointError(f"{path}: experiment: expected a string, got {_json_kind(experiment)}")
    if digest is not None and not (isinstance(digest, str) and _HEX64.fullmatch(digest)):
        raise CheckpointError(f"{path}: {DIGEST_KEY}: expected 64 lowercase hex digits")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1):
        raise CheckpointError(f"{path}: epoch: expected a positive integer, got {_json_kind(epoch)}")
    if not isinstance(classes, list) or not _usable_names(classes):
        raise CheckpointError(f"{path}: classes: expected a list of distinct names (non-empty strings of at most "
                              f"{MAX_CLASS_NAME} characters)")
    return RunRecord(run_id, experiment, digest, epoch, tuple(classes))


def _usable_names(names: list) -> bool:
    # Printable only: a name is echoed to terminals (`vaelab sample`, errors) and drawn in figures.
    return (all(isinstance(n, str) and 0 < len(n) <= MAX_CLASS_NAME and n.isprintable() for n in names)
            and len(set(names)) == len(names))


def _read_metrics(folder: Path) -> dict[str, float]:
    path = folder / METRICS_FILE
    if not path.is_file():
        return {}
    metrics = _json_object(path)
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CheckpointError(f"{path}: {key}: expected a number, got {_json_kind(value)}")
    return metrics


def load_state(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The state dict in `path`, weights-only: a file that would need unpickling is refused, in one line."""
    try:
        with warnings.catch_warnings():  # torch's own notes on pickle protocols: not the user's concern
            warnings.simplefilter("ignore")
            # weights_only: a checkpoint is tensors, never code to run.
            state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's text here invites weights_only=False; vaelab offers no such thing.
        named = re.search(r"GLOBAL (\S+)", str(err))
        what = f"it names {named.group(1)}" if named else "it holds pickled objects"
        raise CheckpointError(f"{path}: cannot load weights safely: not a weights-only state dict ({what}; "
                              "refused: vaelab never unpickles)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        text = str(err).strip()
        first_line = text.splitlines()[0] if text else type(err).__name__
        if "weights_only" in first_line:
            first_line = "not a weights-only state dict; refused: vaelab never unpickles"
        raise CheckpointError(f"{path}: cannot load weights safely ({first_line})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return state


def _class_count(state: dict[str, torch.Tensor], path: Path) -> int:
    # Checkpoints written before conditional models existed have no class count: unconditional.
    state.setdefault("n_classes", torch.tensor(0))
    count = state["n_classes"]
    if count.numel() != 1 or count.is_floating_point() or count.is_complex() or int(count) < 0:
        raise CheckpointError(f"{path}: n_classes: expected one non-negative integer, got a {count.dtype} "
                              f"tensor of shape {list(count.shape)}")
    return int(count)


def _shape_mismatch(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str | None:
    """What differs between the tensors a spec's model has and those a file holds, or None."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    parts = []
    for key, tensor in expected.items():
        if key in state and tuple(state[key].shape) != tuple(tensor.shape):
            parts.append(f"{key} is {list(state[key].shape)} in {MODEL_FILE} but {list(tensor.shape)} "
                         f"for {SPEC_FILE}")
            break
    if missing:
        parts.append(f"{len(missing)} missing (first: {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
    return "; ".join(parts) or None


def _build(spec: RunSpec, state: dict[str, torch.Tensor], path: Path, device: torch.device | str) -> VAE:
    n_classes = _class_count(state, path)
    # Shapes first, on the meta device: a file that does not fit costs no memory (a hostile class count
    # would otherwise size the real layers).
    with torch.device("meta"):
        skeleton = build_model(spec, image_shape(spec.data), n_classes or None)
    mismatch = _shape_mismatch(skeleton.state_dict(), state)
    if mismatch:
        raise CheckpointError(f"{path}: weights do not match {SPEC_FILE}: {mismatch}")
    model = build_model(spec, image_shape(spec.data), n_classes or None).to(device)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        detail = str(err).strip().splitlines()[-1].strip() if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: weights do not match {SPEC_FILE} ({detail})") from None
    return model


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
    # The small JSON files first: a malformed one is named before any weights are read.
    record = read_run_record(folder)
    metrics = _read_metrics(folder)
    state = load_state(folder / MODEL_FILE, device)
    digest = weights_digest(state)  # before the class count is filled in: as the file holds it
    model = _build(spec.base, state, folder / MODEL_FILE, device)
    model.eval()
    classes = record.classes if record else ()
    if model.num_classes and classes and len(classes) != model.num_classes:
        raise CheckpointError(f"{folder / RUN_FILE}: classes: {len(classes)} names for a model of "
                              f"{model.num_classes} classes")
    return Checkpoint(model=model, run_spec=spec.base, name=spec.name, likelihood=model.likelihood,
                      metrics=metrics, run_id=record.run_id if record else None, digest=digest, classes=classes,
                      epoch=record.epoch if record else None)
