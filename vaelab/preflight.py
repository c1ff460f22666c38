"""Pre-flight check, before anything is built in real memory: the run's model is built on torch's
meta device (shapes, no storage), a dry forward pass there checks that it fits the images, and
meta passes measure what each row of each pass holds (vaelab.models.footprint). From these, the
peak of each phase: training (weights, gradients, Adam's two moments, a step's tensors for
min(train.batch_size, training images) examples, times the codes per image of a k-sample bound
(loss.iw_k: every code is decoded and back-propagated), times the stack's members), each evaluator that
will run (the rows it holds at once within the evaluation budget, and the weights), the figures.
The estimate is said in one line before training and logged (tag vaelab.preflight); a run whose
peak would pass LIMIT of the memory available is refused in one line naming the phase and the keys
that lower it, in seconds, with nothing allocated."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vaelab.errors import ConfigError
from vaelab.models.build import build_model
from vaelab.models.footprint import Footprint, RowBytes, budget_for, measure, meta_state
from vaelab.models.vae import VAE
from vaelab.objectives import objective_of
from vaelab.runspec import RunSpec, flatten, unused_keys

LIMIT = 0.8  # refuse a run whose estimated peak passes this share of the memory available
# Matplotlib's canvases and the PNG encoder at screen size (vaelab.figures.SCREEN_PX), scikit-learn's t-SNE.
FIGURE_EXTRA_BYTES = 256 * 2**20
# Keys that size a model: the pre-flight names those a run uses.
SIZE_KEYS = ("model.hidden", "model.channels")
MB = 2**20
GB = 2**30


@dataclass(frozen=True)
class Phase:
    name: str  # training, evaluation, figures
    bytes: float  # above what the process holds before the model is built
    detail: str = ""  # the evaluator that peaks, for evaluation


@dataclass(frozen=True)
class Preflight:
    n_params: int
    activation_mb: float  # a training step's tensors for one batch (all members of a stack, all codes), x HIDDEN
    device_free_mb: float | None  # memory available to the process (what it holds included); None: unknown
    held_mb: float  # what the process held when the check ran (data, libraries)
    phases: tuple[Phase, ...]
    footprint: Footprint
    device: str

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda p: p.bytes)

    @property
    def peak_mb(self) -> float:
        return self.held_mb + self.peak.bytes / MB

    @property
    def line(self) -> str:
        """The estimate in one line, as printed before training and logged as tag vaelab.preflight."""
        parts = ", ".join(f"{p.name} {_gb(p.bytes)}" + (f" [{p.detail}]" if p.detail else "") for p in self.phases)
        of = f" of {self.device_free_mb / 1024:.1f} GB available on {self.device}" if self.device_free_mb else ""
        return (f"pre-flight: peak about {self.peak_mb / 1024:.1f} GB ({self.held_mb / 1024:.1f} GB held now + the "
                f"largest of: {parts}){of}; {self.n_params:,} parameters")


def _gb(nbytes: float) -> str:
    return f"{nbytes / GB:.1f} GB"


def held_bytes(device: torch.device) -> float:
    """What this process holds now on `device`: its resident memory, or the CUDA memory its tensors take
    (allocated, not reserved: blocks torch's cache keeps after an earlier trial in this process are reusable,
    and `available_bytes` counts them as room)."""
    if device.type == "cuda":
        return float(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _page_size()
    except (OSError, IndexError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def _page_size() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE")


def available_bytes(device: torch.device) -> float | None:
    """Memory the process could reach on `device`: what it holds plus what the system has free (Linux's
    MemAvailable; CUDA's free memory). None where unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free) + float(torch.cuda.memory_reserved(device))  # the cache's blocks are the process's room
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024.0 + held_bytes(device)
    except OSError:
        pass
    return None


def meta_model(run: RunSpec, shape: tuple[int, int, int], n_classes: int | None = None) -> VAE:
    """The run's model on the meta device: its parameters have shapes and no storage."""
    try:
        with torch.device("meta"):
            return build_model(run, shape, n_classes)
    except ConfigError:
        raise
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"model does not fit images of shape {shape}: {str(err).splitlines()[0]}") from None


def dry_forward(model: VAE, shape: tuple[int, int, int]) -> None:
    """A forward pass of two images through `model` (on meta copies of its weights: nothing computed);
    a model that does not fit the images is a one-line ConfigError."""
    class _Forward(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self) -> torch.Tensor:
            x = torch.rand(2, *shape, device="meta")
            y = torch.zeros(2, dtype=torch.long, device="meta")
            return self.model(x, y=y).params

    try:
        with torch.inference_mode():
            params = torch.func.functional_call(_Forward(), meta_state(model), ())
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"model does not fit images of shape {shape}: {str(err).splitlines()[0]}") from None
    if params.shape[1:] != torch.Size(shape):
        raise ConfigError(f"decoder returns {tuple(params.shape[1:])} for images of shape {shape}")


def estimate(runs: list[RunSpec], rows: RowBytes, n_train: int, n_test: int,
             discrete: bool, room: float | None = None) -> tuple[tuple[Phase, ...], Footprint]:
    """Each phase's peak bytes for `runs` (one, or a stack's members) and the evaluation budget (within
    `room` bytes where known: what the machine leaves for evaluation's rows)."""
    from vaelab.evaluation.evaluators import EVALUATORS
    from vaelab.evaluation.record import Facts, settle
    from vaelab.figures import TRAVERSAL_STEPS, figure_passes, figure_plan

    run, k = runs[0], len(runs)
    batch = max(1, min(run.train.batch_size, n_train))
    weights = rows.param_bytes
    footprint = Footprint(rows, budget_for(rows, batch, None if room is None else room - len(runs) * 2 * weights))
    # Weights and Adam's two moments; the gradients are in train_fixed (counted by the meta backward). A k-sample
    # bound decodes k codes per image: a training row's bytes x k (an upper bound: the encoder's share counts k times).
    training = k * (3 * weights + rows.train_fixed + batch * _samples(run) * rows.train)
    phases = [Phase("training", training)]
    # After training each member keeps its weights and last gradients; one member is evaluated at a time.
    kept = k * 2 * weights
    epochs = run.train.epochs
    facts = Facts(run, n_train, n_test, epochs, discrete, figure_passes(run, n_train, n_test, epochs))
    by_evaluator = {}
    for evaluator, settings, _ in settle(facts, [(e, e.turned_off(run)) for e in EVALUATORS.values()]):
        if settings is not None and evaluator.passes(settings):
            kind, held = evaluator.holds(facts, settings)
            by_evaluator[evaluator.name] = footprint.held(kind, held)
    if by_evaluator:
        name = max(by_evaluator, key=lambda n: by_evaluator[n])
        phases.append(Phase("evaluation", kept + by_evaluator[name], name))
    if run.eval.figures:
        plan = figure_plan(run, n_train, n_test, epochs)
        most = max(plan.samples, plan.dims * TRAVERSAL_STEPS)  # the most codes one figure decodes
        encoded = max(1, min(run.eval.batch_size, n_test))  # t-SNE's latent means, a batch at a time
        drawn = max(footprint.held("decode", most), footprint.held("encode", encoded))
        phases.append(Phase("figures", kept + drawn + FIGURE_EXTRA_BYTES))
    return tuple(phases), footprint


def _samples(run: RunSpec) -> int:
    """Codes a training step decodes per image: the k of the run's k-sample bound, else 1."""
    return objective_of(run).samples_per_image(run.loss)


def _keys(run: RunSpec, weights_first: bool) -> list[tuple[str, str]]:
    """(key, key=value) of the keys that lower a phase's memory, as the run has them: the training
    batch (evaluation's budget follows it) and the image size first, or the model's size where the
    weights outweigh a step's tensors."""
    unused, flat = unused_keys(run), flatten(run)
    size = [key for key in SIZE_KEYS if key not in unused and flat.get(key) is not None]
    batch = ["train.batch_size"] + ([] if "data.image_size" in unused else ["data.image_size"])
    bound = objective_of(run).bound
    if bound is not None and _samples(run) > 1:  # k codes per image: k lowers a step's tensors as the batch does
        batch.insert(1, bound.key.dotted)
    keys = size + batch if weights_first else batch + size
    return [(key, f"{key}={_value(flat.get(key))}") for key in keys]


def _value(value: object) -> str:
    return str(list(value)) if isinstance(value, list | tuple) else str(value)


def check(runs: list[RunSpec], shape: tuple[int, int, int], n_train: int, n_test: int, device: torch.device,
          n_classes: int | None = None, available: float | None = None) -> Preflight:
    """Estimate `runs`' peak memory (one run, or a stack's members) before any real weight exists, and
    raise a one-line ConfigError where it does not fit: the model does not fit the images, or a phase
    would pass LIMIT of the memory available (`available` bytes: measured when None)."""
    run = runs[0]
    model = meta_model(run, shape, n_classes)
    dry_forward(model, shape)
    try:
        rows = measure(model, shape)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"model does not fit images of shape {shape}: {str(err).splitlines()[0]}") from None
    held = held_bytes(device)
    total = available if available is not None else available_bytes(device)
    room = None if total is None else LIMIT * total - held - FIGURE_EXTRA_BYTES
    phases, footprint = estimate(runs, rows, n_train, n_test, bool(model.likelihood.discrete), room)
    batch = max(1, min(run.train.batch_size, n_train))
    flight = Preflight(n_params=rows.n_params, activation_mb=len(runs) * batch * _samples(run) * rows.train / MB,
                       device_free_mb=None if total is None else total / MB, held_mb=held / MB, phases=phases,
                       footprint=footprint, device=str(device))
    if total is not None and held + flight.peak.bytes > LIMIT * total:
        peak = flight.peak
        weights = len(runs) * (3 * rows.param_bytes + rows.train_fixed)  # weights, Adam's moments, gradients
        keys = _keys(run, weights_first=peak.name == "training" and weights > peak.bytes / 2)
        if len(runs) > 1:
            keys.append(("search.stack", f"{len(runs)} stacked members (search.stack)"))
        where = f"{peak.name} [{peak.detail}]" if peak.detail else peak.name
        raise ConfigError(
            f"needs about {math.ceil((held + peak.bytes) / MB):,} MB in {where} ({', '.join(s for _, s in keys)}; "
            f"{rows.n_params:,} parameters) but {device} has {total / MB:,.0f} MB available; vaelab refuses above "
            f"{LIMIT * 100:.0f} % of it: lower {' or '.join(k for k, _ in keys[:2])}")
    return flight


__all__ = ["LIMIT", "Phase", "Preflight", "available_bytes", "check", "dry_forward", "estimate", "meta_model"]
