"""What a model's passes hold in memory, per row, measured without memory: the passes run on torch's
meta device (tensors with shapes and no storage) under a dispatch mode that counts the bytes of the
tensors alive at each step and keeps the peak. From these, evaluation and figures size their chunks
by a byte budget (`rows`), so their peak follows the budget and not the image size, and the
pre-flight check (vaelab.preflight) estimates each phase before any real weight exists.

A measured peak counts the tensors PyTorch's operators return; kernels also keep working buffers it
does not see (oneDNN's reordered copies of a convolution's input and output on a CPU): the real
peak was 1.0-1.8 times the counted one over the MLP, conv and resnet at 28-512 px, so every row's
bytes are the counted ones times HIDDEN."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vaelab.models.vae import VAE

HIDDEN = 2.0
# Evaluation and figures may hold at least this many bytes of rows at once (the training batch's
# activations when more): the 16,384 decoder rows the IWAE estimate always held before budgets, for a
# conv model on 28 px images (about 129 KB a row), so MNIST-size runs chunk as they did, bit for bit.
FLOOR_BYTES = 2304 * 2**20
KINDS = ("train", "forward", "encode", "decode")


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages alive, counted as operators make them and freed as they die; the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.peak = 0
        self._alive: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.now -= nbytes
        self._alive.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, Tensor):
                continue
            storage = tensor.untyped_storage()  # one Python object per storage: views share it
            key = id(storage)
            if key in self._alive:
                continue
            self._alive.add(key)
            self.now += storage.nbytes()
            weakref.finalize(storage, self._free, key, storage.nbytes())
        self.peak = max(self.peak, self.now)
        return out


@dataclass(frozen=True)
class RowBytes:
    """Bytes one row adds at a pass's peak (counted x HIDDEN), and the bytes a pass holds whatever its
    rows: `train` one training example (forward, loss, backward; the gradients of the weights are in
    `train_fixed`), `forward` one image through encoder, sample, decoder and its log-likelihood (the
    ELBO's terms), `encode` one image to its posterior, `decode` one code decoded and scored against
    its image (an importance sample; a sample figure's decode is less)."""

    train: float
    forward: float
    encode: float
    decode: float
    train_fixed: float
    param_bytes: int
    n_params: int
    shape: tuple[int, int, int]

    def of(self, kind: str) -> float:
        return float(getattr(self, kind))


class _Pass(nn.Module):
    """One pass of `model` over n meta rows, as a module, so that functional_call can run it on meta
    copies of the weights of a model that lives on a real device."""

    def __init__(self, model: VAE, kind: str, n: int, shape: tuple[int, ...]):
        super().__init__()
        self.model, self.kind, self.n, self.shape = model, kind, n, shape

    def forward(self) -> Tensor:
        model, n = self.model, self.n
        y = torch.zeros(n, dtype=torch.long, device="meta") if model.num_classes else None
        if self.kind == "decode":
            # A sampled code through the prior and the decoder, as the IWAE estimate takes it (a VampPrior's
            # rows x components matrices, a second level's passes).
            mu = torch.zeros(n, model.z_dim, device="meta")
            params, _, log_ratio = model.latent_pass(mu, mu, torch.randn(n, model.noise_dim, device="meta"), y)
            return model.likelihood.log_prob(torch.rand(n, *self.shape, device="meta"), params) - log_ratio
        x = torch.rand(n, *self.shape, device="meta")
        if self.kind == "encode":
            return model.encode(x, y)[0]
        out = model(x, y=y)
        # The ELBO's terms (the model's KL, closed form or Monte Carlo): what a step holds, to the byte.
        loss = (out.kl.sum(1) - model.likelihood.log_prob(x, out.params)).mean()
        if self.kind == "train":
            loss.backward()
        return loss


def meta_state(model: nn.Module, prefix: str = "model.", grads: bool = False) -> dict[str, Tensor]:
    """Meta copies of `model`'s parameters and buffers, named as a wrapper holding it as `model` sees
    them; with `grads`, every floating-point parameter takes gradients (a frozen model's backward is
    measured as a trained one's)."""
    state = {name: torch.empty_like(p, device="meta").requires_grad_(p.requires_grad or grads and p.is_floating_point())
             for name, p in model.named_parameters()}
    state.update({name: torch.empty_like(b, device="meta") for name, b in model.named_buffers()})
    return {f"{prefix}{name}": tensor for name, tensor in state.items()}


def _peak(model: VAE, kind: str, n: int, shape: tuple[int, ...]) -> int:
    """Counted peak bytes of one pass over n rows, on meta copies of the weights (weights not counted)."""
    validating = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)  # a meta tensor has no values to check
    try:
        # Outside any caller's inference mode for a training step: its weights must take gradients.
        with torch.inference_mode(kind != "train"), torch.set_grad_enabled(kind == "train"):
            state = meta_state(model, grads=kind == "train")
            with _LiveBytes() as live:
                torch.func.functional_call(_Pass(model, kind, n, shape), state, ())
    finally:
        torch.distributions.Distribution.set_default_validate_args(validating)
    return live.peak


def image_shape(model: VAE) -> tuple[int, int, int]:
    """The images `model` decodes to, from a meta decode of one code."""
    state = meta_state(model)
    y = torch.zeros(1, dtype=torch.long, device="meta") if model.num_classes else None

    class _Decode(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self) -> Tensor:
            return self.model.decode(torch.zeros(1, model.z_dim, device="meta"), y)

    with torch.inference_mode():
        out = torch.func.functional_call(_Decode(), state, ())
    channels, height, width = out.shape[1:]
    return channels, height, width


def measure(model: VAE, shape: tuple[int, int, int] | None = None) -> RowBytes:
    """Each pass's bytes per row, from meta passes over 2 and 4 rows (their difference is the
    rows' share; what a pass holds whatever its rows, such as the weights' gradients, is not)."""
    shape = shape or image_shape(model)
    per_row, fixed = {}, {}
    for kind in KINDS:
        two, four = _peak(model, kind, 2, shape), _peak(model, kind, 4, shape)
        per_row[kind] = HIDDEN * max(four - two, 0) / 2 or HIDDEN * four / 4
        # What a pass holds whatever its rows (the weights' gradients) is what it is: HIDDEN covers what the
        # meta passes cannot see per row (allocator slack, kernels' workspaces), not the weights' own bytes.
        fixed[kind] = max(two - (four - two), 0)
    params = list(model.parameters())
    return RowBytes(train=per_row["train"], forward=per_row["forward"], encode=per_row["encode"],
                    decode=per_row["decode"], train_fixed=fixed["train"],
                    param_bytes=sum(p.numel() * p.element_size() for p in params),
                    n_params=sum(p.numel() for p in params), shape=shape)


@dataclass(frozen=True)
class Footprint:
    """A model's bytes per row and the budget its evaluation and figures hold rows within."""

    per_row: RowBytes
    budget: float

    def rows(self, kind: str, cap: int) -> int:
        """Rows of pass `kind` to hold at once: as many as the budget allows, at most `cap`, at least one."""
        return max(1, min(int(cap), int(self.budget // max(self.per_row.of(kind), 1.0))))

    def held(self, kind: str, rows: int) -> float:
        """Bytes `rows` rows of pass `kind` hold at its peak, chunked within the budget."""
        return min(rows, self.rows(kind, rows)) * self.per_row.of(kind)


def budget_for(per_row: RowBytes, train_rows: int, room: float | None = None) -> float:
    """Evaluation's budget: what a training batch of `train_rows` examples holds, at least FLOOR_BYTES where
    there is `room` for it (bytes the machine has left for evaluation's rows; None: not known). A small
    machine chunks finer rather than being refused: the numbers do not depend on the chunks."""
    floor = FLOOR_BYTES if room is None else max(0.0, min(FLOOR_BYTES, room))
    return max(floor, per_row.train * train_rows)


_ATTACHED: weakref.WeakKeyDictionary[nn.Module, Footprint] = weakref.WeakKeyDictionary()


def attach(model: VAE, footprint: Footprint) -> None:
    """`model`'s footprint from now on (the run's, with its training batch's budget)."""
    _ATTACHED[model] = footprint


def footprint(model: VAE) -> Footprint:
    """The footprint attached to `model`, or one measured now with the floor's budget (a model
    loaded from a checkpoint, a test's)."""
    found = _ATTACHED.get(model)
    if found is None:
        found = Footprint(measure(model), FLOOR_BYTES)
        _ATTACHED[model] = found
    return found


def rows(model: VAE, kind: str, cap: int) -> int:
    """Rows of pass `kind` `model` may hold at once under its budget, at most `cap`."""
    return footprint(model).rows(kind, cap)


def in_chunks(fn: Callable[[int, int], Tensor], total: int, size: int) -> Tensor:
    """fn(start, stop) over [0, total) in pieces of `size`, concatenated; one call when it fits."""
    if total <= size:
        return fn(0, total)
    return torch.cat([fn(start, min(start + size, total)) for start in range(0, total, size)])


__all__ = ["FLOOR_BYTES", "HIDDEN", "Footprint", "RowBytes", "attach", "budget_for", "footprint", "image_shape",
           "in_chunks", "measure", "meta_state", "rows"]
